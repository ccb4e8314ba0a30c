"""`SharedModel`: one loaded model shared by the owner's threads (the daemon's worker, the HTTP app's engine
thread, an index job); loads once, encodes one call at a time (ClipModel is one-caller-at-a-time)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from indexer.model.clip import ClipModel
from indexer.model.lazy import LazyModel
from indexer.settings import ModelSettings


class _LockedClip(ClipModel):
    """The same loaded model, its encode calls serialised by a lock (ClipModel is one-caller-at-a-time)."""

    def __init__(self, inner: ClipModel, lock: threading.RLock) -> None:
        self.__dict__.update(inner.__dict__)
        self._lock = lock

    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        with self._lock:
            return super().encode_pixels(pixels)

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        with self._lock:
            return super().encode_texts(texts)


class SharedModel(LazyModel):
    """A LazyModel safe to share between the worker and the control server: loads once, encodes one at a time."""

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.lock = threading.RLock()
        self._shared: ClipModel | None = None

    def get(self) -> ClipModel:
        with self.lock:
            if self._shared is None:
                self._shared = _LockedClip(super().get(), self.lock)
            return self._shared

    def close(self) -> None:
        with self.lock:
            self._shared = None
            super().close()
