"""The one ingest loop: a source of decoded images in, the model, a sink out.

    source (files through the decode pool, shard samples, ...)  →  embed_batches (the model, on its own thread)
        →  background writer thread  →  sink (the store, a Parquet/npy file, Ray part files, ...)

`run_loop` drives it; `drain` is its second half alone, for batches embedded elsewhere (the Ray driver receives
them from its actors). Every item takes the same two branches: a failure is logged, counted, shown on the progress
bar and handed to the sink (which may drop a stale vector, and says how the failure is recorded); a batch is
written by the sink, counted and shown. Sink writes run one at a time, in order, on the writer thread, overlapping
the next batch; leaving the loop (Ctrl-C included) first writes what is queued.

A new source is one class with ``decoded()``; a new sink is one class with ``write`` and ``fail``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from indexer.ingest.embed import EmbeddedBatch, embed_batches
from indexer.ingest.writer import BackgroundWriter
from indexer.records import Decoded, Failure, PreprocessSpec, RunSummary

__all__ = ["Model", "NoProgress", "Progress", "Sink", "Source", "Stop", "drain", "never", "run_loop"]

log = logging.getLogger(__name__)

B = TypeVar("B", bound=EmbeddedBatch)
B_contra = TypeVar("B_contra", bound=EmbeddedBatch, contravariant=True)

Stop = Callable[[], bool]

WRITE_QUEUE = 16  # embedded batches waiting for the sink


def never() -> bool:
    """A `Stop` that never stops."""
    return False


class Progress(Protocol):
    """What the loop reports while it works (the CLI draws a bar from it)."""

    def start(self, total: int, what: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """A Progress that shows nothing."""

    def start(self, total: int, what: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class Model(Protocol):
    """What the loop needs of the model (`indexer.model.lazy.LazyModel` is one)."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def preprocess(self) -> PreprocessSpec: ...

    @property
    def batch_size(self) -> int: ...

    def start(self, *towers: str) -> None: ...

    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...


class Source(Protocol):
    """Decoded images (and the failures met decoding them), in the order they should be stored. Closing the
    iterator cancels what is still being decoded."""

    def decoded(self) -> Iterator[Decoded | Failure]: ...


class Sink(Protocol[B_contra]):
    """Where embedded batches go. Both methods run on the writer thread, one call at a time, in order."""

    def write(self, batch: B_contra) -> None:
        """Store or write one batch (row i of ``batch.vectors`` belongs to ``batch.metas[i]``)."""

    def fail(self, failure: Failure) -> Failure:
        """A file or sample that could not be decoded or embedded; returns it as it is to be recorded."""


def run_loop(
    source: Source,
    model: Model,
    sink: Sink[EmbeddedBatch],
    summary: RunSummary,
    progress: Progress,
    *,
    stop: Stop = never,
    on_batch: Callable[[EmbeddedBatch], None] | None = None,
) -> None:
    """Decode ``source``, embed with ``model``, write to ``sink``. ``stop()`` is asked after every item: what is
    left is not lost (it is still on disk for the next run), and ``summary.interrupted`` says so."""
    decoded = source.decoded()
    model.start("visual")  # the network loads while the first files decode
    try:
        drain(embed_batches(decoded, model.encode_pixels, model.batch_size), sink, summary, progress,
              stop=stop, on_batch=on_batch)  # fmt: skip
    finally:
        close = getattr(decoded, "close", None)
        if close is not None:
            close()  # cancels the files submitted to decode workers and not consumed


def drain(
    items: Iterable[B | Failure],
    sink: Sink[B],
    summary: RunSummary,
    progress: Progress,
    *,
    stop: Stop = never,
    on_batch: Callable[[B], None] | None = None,
) -> None:
    """Hand every embedded batch and failure to ``sink`` through the background writer (writes overlap the next
    batch; during the loop the sink belongs to the writer thread). The queue holds up to `WRITE_QUEUE` batches:
    vectors and metadata only (256 × 768-d: under 1 MB each), enough to keep decoding and embedding while the
    sink stalls for a second (the store's payload indexes made at the first write)."""
    with BackgroundWriter(depth=WRITE_QUEUE) as writer:
        for item in items:
            writer.submit(functools.partial(_take, item, sink, summary, progress, on_batch))
            if stop():
                summary.interrupted = True
                return


def _take(
    item: B | Failure, sink: Sink[B], summary: RunSummary, progress: Progress, on_batch: Callable[[B], None] | None
) -> None:
    if isinstance(item, Failure):
        log.warning("skipping %s: %s", item.path, item.reason)
        summary.add_failure(sink.fail(item))
        progress.advance(1)
        return
    sink.write(item)
    summary.indexed += len(item.metas)
    progress.advance(len(item.metas))
    if on_batch is not None:
        on_batch(item)
