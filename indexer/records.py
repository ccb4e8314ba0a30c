"""Typed records passed between the pipeline stages (scan → decode → embed → store → search)."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# The search defaults, in one place (here, not in settings.py: the store's process imports no pydantic): the
# settings, the store, `search.Query` and the CLI read them from here.
SEARCH_LIMIT = 10  # results per query when none is asked
SEARCH_LIMIT_MAX = 10_000  # the most `search.limit` may be set to
SEARCH_THRESHOLD: float | None = None  # minimum cosine score when none is asked (None: no minimum)

# Namespace for deterministic point ids: uuid5(namespace, absolute path).
POINT_NAMESPACE = uuid.UUID("6f1c3b1e-8a57-4f0e-9d43-2a8a5d0c9b11")


def point_id(path: Path | str) -> str:
    """The deterministic point id of a file: a UUID5 of its absolute path.

    Hashed from the bytes of the name (``os.fsencode``), so a name that is not valid UTF-8 gets an id too instead of
    raising; for every UTF-8 name this is exactly ``uuid.uuid5(POINT_NAMESPACE, str(path))``."""
    digest = hashlib.sha1(POINT_NAMESPACE.bytes + os.fsencode(path)).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


NOT_UTF8 = "file name is not valid UTF-8 (rename it, e.g. with convmv, to index it)"


def name_problem(path: Path | str) -> str | None:
    """Why a path cannot be stored (payloads are JSON, i.e. UTF-8 text), or None when it can."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    return None


def display_path(path: Path | str) -> str:
    """The path as printable UTF-8 text: bytes of the name that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def dirs_of(path: Path | str) -> list[str]:
    """Every ancestor directory of ``path`` except the filesystem root: the payload field that folder filters match."""
    return [str(p) for p in Path(path).parents if p != Path(p.anchor)]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file found on disk by the scanner."""

    path: Path  # absolute
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How the model wants its input: open_clip's eval transform, expressed as data (picklable)."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # "shortest" (resize + center crop) | "squash"
    crop_rounding: str = "round"  # centre-crop offset: "round" (torchvision, open_clip) | "floor" (transformers)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Guards against hostile or absurd inputs."""

    max_pixels: int = 178_956_970  # PIL's own default bomb threshold (2x is an error there)
    max_file_bytes: int = 512 * 1024 * 1024
    full_resolution: bool = False  # decode JPEGs at full size (no DCT draft): exact parity, slower
    memory_budget: int = 0  # bytes of big decodes a pool's workers hold at once (indexer.decode.budget); 0: no bound


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What we know about a decoded file; stored as the point's payload."""

    path: Path
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    format: str

    def extra_payload(self) -> dict[str, Any]:
        """Payload fields a kind of source adds to the file's own (a shard's sample: shard, key, caption...)."""
        return {}


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded file: its metadata and model-ready pixels (uint8, CHW, image_size x image_size)."""

    meta: ImageMeta
    pixels: npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Failure:
    """A file that could not be indexed, and why; with the size and mtime it had when that is known (a later
    `indexer index` does not retry a failed file that still has them)."""

    path: Path
    reason: str
    size: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A point as the store holds it."""

    id: str
    payload: dict[str, Any]
    vector: npt.NDArray[np.float32] | None = None

    @property
    def path(self) -> str:
        return str(self.payload.get("path", ""))


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result."""

    id: str
    score: float
    payload: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.payload.get("path", ""))


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Metadata conditions a query can carry; all given ones must hold."""

    path_prefix: str | None = None
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None
    mtime_from: float | None = None
    mtime_to: float | None = None
    cluster: int | None = None

    def is_empty(self) -> bool:
        return self == SearchFilter()


@dataclass(slots=True)
class RunSummary:
    """What one index/embed run did; `--json` prints it."""

    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    known_failures: int = 0  # files that failed before and are unchanged: not read again (not in ``failed``)

    def add_failure(self, failure: Failure) -> None:
        self.failed += 1
        self.failures.append(failure)

    def as_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "removed": self.removed,
            "failed": self.failed,
            "failures": [{"path": str(f.path), "reason": f.reason} for f in self.failures],
            "interrupted": self.interrupted,
            "known_failures": self.known_failures,
        }
