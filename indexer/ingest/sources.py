"""Sources of the ingest loop (`indexer.ingest.loop`): what yields decoded images, in the order they are stored.

Files go through a decode pool (worker processes); the samples of tar shards are read in order and decoded on
threads. A new kind of input is one class here with a ``decoded()`` method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from indexer.decode.mixed import Decoder
from indexer.records import Decoded, DecodeLimits, Failure, FileEntry, PreprocessSpec
from indexer.sources.shards import decode_shards

__all__ = ["Chain", "FileSource", "ShardSource"]


@dataclass(frozen=True)
class FileSource:
    """Image files, decoded by ``decoder`` (a pool, or in-process for a few)."""

    entries: Sequence[FileEntry]
    decoder: Decoder

    def decoded(self) -> Iterator[Decoded | Failure]:
        return self.decoder.imap(e.path for e in self.entries)


@dataclass(frozen=True)
class ShardSource:
    """The samples of tar shards, shard after shard, each tar read once in order, decoded on ``threads``."""

    shards: Sequence[FileEntry]
    spec: PreprocessSpec
    limits: DecodeLimits
    threads: int = 1

    def decoded(self) -> Iterator[Decoded | Failure]:
        return decode_shards(self.shards, self.spec, self.limits, threads=self.threads)


@dataclass(frozen=True)
class Chain:
    """Several sources, one after the other (closing it closes the one being read)."""

    sources: Sequence[FileSource | ShardSource]

    def decoded(self) -> Iterator[Decoded | Failure]:
        for source in self.sources:
            yield from source.decoded()
