"""What the settings say about decoding, in one place: the limits every decode path applies (the pipeline's pool,
shard threads, the Ray decode tasks, the API's query images and thumbnails) and how many decoders to run."""

from __future__ import annotations

from dataclasses import replace

from indexer.decode.budget import auto_memory_budget
from indexer.decode.pool import default_workers
from indexer.records import DecodeLimits
from indexer.settings import Settings

__all__ = ["decode_limits", "decode_workers"]


def decode_limits(settings: Settings, *, max_file_bytes: int | None = None) -> DecodeLimits:
    """The decode stage's limits and choices, from the settings (``max_file_bytes``: a tighter size cap of the
    caller's, e.g. the API's request body limit)."""
    limits = DecodeLimits(
        max_pixels=settings.decode.max_pixels,
        max_file_bytes=int(settings.decode.max_file_mb * 1024 * 1024),
        full_resolution=settings.decode.full_resolution,
        memory_budget=(settings.decode.memory_mb << 20) or auto_memory_budget(),
    )
    return limits if max_file_bytes is None else replace(limits, max_file_bytes=max_file_bytes)


def decode_workers(settings: Settings) -> int:
    """``decode.workers``, or one per CPU this process may use when it is 0."""
    return settings.decode.workers or default_workers()
