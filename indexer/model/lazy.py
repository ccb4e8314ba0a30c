"""The model's identity now, its network later, and neither needs torch to be imported.

`LazyModel` knows at once what the store and the decoders need — the model id, the vector size, the
preprocessing geometry, the batch size — from the weights' source alone (:mod:`indexer.model.weights`). The network is
built (torch, open_clip: seconds of imports) only when something is to be embedded, and `start()` builds it on a
thread of its own, so a command can start its decode workers first and have images decoded by the time the model
is ready: on the 2-core test machine imports and loading take about 6 s of a 12 s `indexer embed` of 96 photos.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from indexer.model.fromstore import remember_source
from indexer.model.weights import CPU_BATCH, GPU_BATCH, preprocess_spec, resolve_source
from indexer.records import PreprocessSpec
from indexer.settings import ModelSettings

if TYPE_CHECKING:
    from indexer.model.clip import ClipModel

__all__ = ["CPU_BATCH", "GPU_BATCH", "LazyModel", "cuda_expected", "preprocess_spec"]

log = logging.getLogger(__name__)


class LazyModel:
    """The model's identity now (weights found, id and dimension known), the network only when first needed.

    A re-run that finds nothing new never pays for building ViT-L/14. Thread-safe: `get()` from any thread
    returns the one model (waiting for a `start()`-ed load to finish).
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.source = resolve_source(settings)
        remember_source(settings, self.source)  # a store it makes finds it again (indexer.model.fromstore)
        self._model: ClipModel | None = None
        self._lock = threading.RLock()
        self._loader: threading.Thread | None = None
        self._load_error: BaseException | None = None

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def dim(self) -> int:
        return int(self.source.config["embed_dim"])

    @property
    def preprocess(self) -> PreprocessSpec:
        """What the decoders produce for this model (the same value as the loaded model's ``preprocess``)."""
        return preprocess_spec(self.source)

    @property
    def batch_size(self) -> int:
        if self._model is not None:
            return self._model.batch_size
        return self.settings.batch_size or (GPU_BATCH if cuda_expected(self.settings.device) else CPU_BATCH)

    def start(self, *towers: str) -> None:
        """Build the network and load ``towers`` on a background thread; `get()` waits for it. Nothing to do
        when the model is loaded or loading already. An error while loading is raised by the next `get()`."""
        with self._lock:
            if self._model is not None or self._loader is not None:
                return
            self._loader = threading.Thread(target=self._load, args=towers, name="model-load", daemon=True)
            self._loader.start()

    def _load(self, *towers: str) -> None:
        try:
            model = self._build()
            model.load(*towers)
        except BaseException as exc:  # handed to get(), on the thread that needs the model
            self._load_error = exc
            return
        self._model = model

    def get(self) -> ClipModel:
        with self._lock:
            loader = self._loader
            if loader is not None:
                loader.join()
                self._loader = None
                error, self._load_error = self._load_error, None
                if error is not None:
                    raise error
            if self._model is None:
                self._model = self._build()
            return self._model

    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """The model's ``encode_pixels``, once it is ready."""
        return self.get().encode_pixels(pixels)

    def close(self) -> None:
        with self._lock:
            if self._loader is not None:
                self._loader.join()
                self._loader, self._load_error = None, None
            if self._model is not None:
                self._model.close()
                self._model = None

    def _build(self) -> ClipModel:
        from indexer.model.clip import build_clip

        return build_clip(self.source, self.settings)


def cuda_expected(device: str) -> bool:
    """Whether ``model.device`` will be a CUDA GPU, without importing torch when it is not imported yet: it sizes
    batches and the decoders' look-ahead before the network is built (the network's own device is torch's
    answer). For ``auto`` that is an NVIDIA (or ROCm) device node, unless CUDA_VISIBLE_DEVICES hides them all."""
    if device != "auto":
        return device.startswith("cuda")
    torch = sys.modules.get("torch")
    if torch is not None and not getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return bool(torch.cuda.is_available())  # imported completely (not still being imported by start())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
