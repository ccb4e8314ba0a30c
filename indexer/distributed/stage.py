"""The embedding actors: the one the ``--ray`` engine runs on parts, and ``ImageEmbedder``, NeMo Curator's stage's
counterpart for people who build their own Ray Data pipelines. Neither imports ray: Ray runs them as actors.

Weights load once per actor, from a local path on the actor's node (no hub at run time: ``allow_download`` off).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.distributed.parts import pixels_of
from indexer.settings import ModelSettings

log = logging.getLogger(__name__)


def model_settings_for(model_dir: str | Path, batch_size: int, device: str = "auto") -> ModelSettings:
    """Settings for the model at ``model_dir``: a directory holding an open_clip ``config.json`` (or
    ``open_clip_config.json``) and its weights, a config ``.json`` file, or a directory of cached ViT-L/14 weights."""
    path = Path(model_dir).expanduser()
    for name in ("config.json", "open_clip_config.json"):
        if (path / name).is_file():
            return ModelSettings(name=str(path / name), batch_size=batch_size, device=device, allow_download=False)
    if path.suffix == ".json":
        return ModelSettings(name=str(path), batch_size=batch_size, device=device, allow_download=False)
    return ModelSettings(dir=str(path), batch_size=batch_size, device=device, allow_download=False)


class PartEmbedder:
    """An actor that turns a decoded part's pixels into vectors (the pixels are dropped from the row)."""

    def __init__(self, model: str, die_marker: str = "") -> None:
        from indexer.model.clip import load_model

        self.model = load_model(ModelSettings.model_validate_json(model))
        self.die_marker = die_marker  # test-only: die once, mid-batch (see tests/test_distributed.py)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        pixels = pixels_of(row)
        half = len(pixels) // 2
        first = self.model.encode_pixels(pixels[:half])
        self._maybe_die()
        vectors = np.concatenate([first, self.model.encode_pixels(pixels[half:])]).astype(np.float32)
        out = {k: v for k, v in row.items() if k != "pixels"}
        out["dim"] = self.model.dim
        out["model"] = self.model.model_id
        out["vectors"] = np.ascontiguousarray(vectors).tobytes()
        return out

    def _maybe_die(self) -> None:
        if self.die_marker and not os.path.exists(self.die_marker):
            Path(self.die_marker).write_text(str(os.getpid()))
            os._exit(1)


def vectors_of(row: dict[str, Any]) -> npt.NDArray[np.float32]:
    """The (N, dim) float32 vectors an embedded row carries."""
    return np.frombuffer(row["vectors"], dtype=np.float32).reshape(int(row["n"]), int(row["dim"]))


class ImageEmbedder:
    """CLIP image embeddings for ``Dataset.map_batches``, with NeMo Curator's stage's parameter names.

    The batch's ``image_data`` column holds HWC uint8 RGB images (any size; a 4-d array or an object array of
    arrays, as Ray Data gives them); each is resized and cropped as the model wants and the L2-normalised vector
    goes to a new ``embedding`` column ((N, dim) float32). ``remove_image_data`` drops the pixels afterwards.
    ``num_gpus_per_worker`` is what to pass to ``map_batches(num_gpus=...)`` (see ``ray_remote_args``)::

        import ray
        from indexer.distributed.stage import ImageEmbedder

        embedder = dict(model_dir="/models/vit-l-14", model_inference_batch_size=256, num_gpus_per_worker=0.25)
        ds = ray.data.read_images("s3://bucket/images/", mode="RGB")   # column "image"
        ds = ds.rename_columns({"image": "image_data"})
        ds = ds.map_batches(
            ImageEmbedder, fn_constructor_kwargs=embedder, batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=8), **ImageEmbedder.ray_remote_args(**embedder),
        )
        ds.write_parquet("/data/embeddings/")
    """

    def __init__(
        self,
        model_dir: str,
        model_inference_batch_size: int = 256,
        num_gpus_per_worker: float = 0.25,
        remove_image_data: bool = True,
        verbose: bool = False,
        device: str = "auto",
    ) -> None:
        from indexer.model.clip import load_model

        self.model = load_model(model_settings_for(model_dir, model_inference_batch_size, device))
        self.num_gpus_per_worker = num_gpus_per_worker
        self.remove_image_data = remove_image_data
        self.verbose = verbose
        if verbose:
            log.info("ImageEmbedder: %s on %s, batch %d", self.model.model_id, self.model.device,
                     model_inference_batch_size)  # fmt: skip

    @staticmethod
    def ray_remote_args(num_gpus_per_worker: float = 0.25, **_: Any) -> dict[str, float]:
        """The resources to give ``map_batches`` for this stage: the GPU fraction and a small CPU share."""
        return {"num_gpus": num_gpus_per_worker, "num_cpus": 0.25}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from indexer.decode.geometry import preprocess

        images = batch["image_data"]
        pixels = np.stack([preprocess(Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB"),
                                      self.model.preprocess) for im in images])  # fmt: skip
        vectors = self.model.encode_pixels(pixels)
        out = dict(batch)
        if self.remove_image_data:
            del out["image_data"]
        out["embedding"] = vectors
        if self.verbose:
            log.info("ImageEmbedder: embedded %d images", len(vectors))
        return out


def model_json(settings: ModelSettings) -> str:
    """Model settings as JSON, to send to actors (paths must exist on every node)."""
    return json.dumps(settings.model_dump(mode="json"))
