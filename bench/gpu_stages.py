"""Where an in-process `embed` / `index` run spends its time, per stage (bench only): the consumer waiting on the
decoders, the model busy, the writer busy, the main thread blocked on the writer; and what ``decode.gpu`` decided.

`Stages` patches the classes (not the pipeline's module names, which may move): `DecodePool.imap` and
`MixedDecoder.imap` (time the consumer spends in ``next``), `ClipModel.encode_pixels` (the model thread's busy
time) and `BackgroundWriter.submit` (the writer thread's busy time and how long ``submit`` blocked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Figures:
    decode_wait: float = 0.0
    model: float = 0.0
    writer: float = 0.0
    writer_wait: float = 0.0
    decisions: list[str] = field(default_factory=list)
    split: list[tuple[int, int]] = field(default_factory=list)

    def text(self, wall: float) -> str:
        def share(seconds: float) -> str:
            return f"{seconds:6.2f} s ({100 * seconds / max(wall, 1e-9):3.0f}%)"

        line = (
            f"decode wait {share(self.decode_wait)}, model {share(self.model)}, writer {share(self.writer)}, "
            f"blocked on writer {share(self.writer_wait)}"
        )
        if self.split:
            gpu, cpu = (sum(s[i] for s in self.split) for i in (0, 1))
            line += f"; nvJPEG {gpu} / CPU {cpu} files"
        decided = [d for d in self.decisions if d]
        return line + (f"; {decided[-1]}" if decided else "")


def _timed_generator(gen: Generator[Any, None, None], figures: Figures) -> Iterator[Any]:
    try:
        while True:
            start = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                return
            finally:
                figures.decode_wait += time.perf_counter() - start
            yield item
    finally:
        gen.close()


class Stages:
    """``with Stages() as figures:`` around a run; the figures fill in as it goes."""

    def __init__(self) -> None:
        self.figures = Figures()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Figures:
        from indexer.decode.mixed import MixedDecoder
        from indexer.decode.pool import DecodePool
        from indexer.ingest.writer import BackgroundWriter
        from indexer.model.clip import ClipModel

        figures = self.figures
        self._patch(DecodePool, "imap", lambda real: lambda s, paths: _timed_generator(real(s, paths), figures))
        self._patch(MixedDecoder, "imap", lambda real: self._mixed_imap(real))
        self._patch(ClipModel, "encode_pixels", lambda real: self._timing(real, "model"))
        self._patch(BackgroundWriter, "submit", lambda real: self._submit(real))
        return figures

    def __exit__(self, *exc: object) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()

    def _patch(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        real = getattr(owner, name)
        self._saved.append((owner, name, real))
        setattr(owner, name, wrap(real))

    def _timing(self, real: Callable[..., Any], what: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                setattr(self.figures, what, getattr(self.figures, what) + time.perf_counter() - start)

        return timed

    def _mixed_imap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        figures = self.figures

        def imap(decoder: Any, paths: Any) -> Iterator[Any]:
            try:
                yield from _timed_generator(real(decoder, paths), figures)
            finally:
                figures.decisions.append(decoder.decision)
                figures.split.append((decoder.gpu_files, decoder.cpu_files))

        return imap

    def _submit(self, real: Callable[..., Any]) -> Callable[..., Any]:
        timed_write = self._timing

        def submit(writer: Any, write: Callable[[], None]) -> None:
            start = time.perf_counter()
            real(writer, timed_write(write, "writer"))
            self.figures.writer_wait += time.perf_counter() - start

        return submit
