"""The decoders the ingest loop reads files through: a pool sized from the settings, in-process for a few files."""

from __future__ import annotations

from indexer.decode.limits import decode_limits, decode_workers
from indexer.decode.mixed import Decoder, decoder_for
from indexer.records import PreprocessSpec
from indexer.settings import Settings

__all__ = ["IN_PROCESS_BELOW", "Decoders", "decode_pool"]

# Below this many files, decoding in-process beats starting worker processes.
IN_PROCESS_BELOW = 8


def decode_pool(settings: Settings, spec: PreprocessSpec, files: int, batch_size: int) -> Decoder:
    """A decode pool sized from the settings; small jobs decode in-process (no worker start-up).

    The look-ahead (files submitted but not yet consumed) defaults to four batches: the decoders fill them while
    the network is still being imported and loaded (seconds; `LazyModel.start`), and then keep the model fed while
    the next batch decodes. It bounds memory whatever the size of the tree (224 px images: 150 KB each).
    """
    workers = decode_workers(settings)
    if files < IN_PROCESS_BELOW:
        workers = 0
    lookahead = settings.decode.lookahead or max(4 * batch_size, 4 * max(workers, 1))
    return decoder_for(settings, spec, decode_limits(settings), workers, lookahead)  # nvJPEG mixed in on CUDA


class Decoders:
    """The daemon's decoders: in-process for a few files (no worker start-up, the fastest path for one new photo),
    a worker pool for many, made on first need and kept for the daemon's life."""

    def __init__(self, settings: Settings, spec: PreprocessSpec, batch_size: int) -> None:
        self.settings, self.spec, self.batch_size = settings, spec, batch_size
        self._inline = decode_pool(settings, spec, 1, batch_size)
        self._pool: Decoder | None = None

    def for_files(self, count: int) -> Decoder:
        """The pool to decode ``count`` files with."""
        if count < IN_PROCESS_BELOW:
            return self._inline
        if self._pool is None:
            self._pool = decode_pool(self.settings, self.spec, IN_PROCESS_BELOW, self.batch_size)
        return self._pool

    def close(self, wait: bool = True) -> None:
        """Shut the worker pool down."""
        self._inline.close(wait)
        if self._pool is not None:
            self._pool.close(wait)
