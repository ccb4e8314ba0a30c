"""JPEGs split between nvJPEG on the GPU and the CPU decode pool, so both are busy; results as `DecodePool.imap`.

`MixedDecoder.imap` takes files from its input in order, up to ``lookahead`` ahead of what it has yielded. JPEGs
(by extension) go to one shared queue, other files to a CPU-only queue. Two threads of this process take work from
the front of them (oldest first), so the split follows their speeds (work stealing):

- the CPU thread feeds the `DecodePool`: every non-JPEG, and JPEGs whenever the pool has room (its own look-ahead
  bounds how much it holds). It is the first choice: the GPU's time belongs to the model.
- the GPU thread takes the JPEGs the CPU leaves: a chunk of ``gpu_chunk`` once that many wait (the CPU workers are
  all busy), or fewer when the oldest waiting file is the next one to yield or the input has ended. It decodes them
  with `NvJpegDecoder` on its own CUDA stream (a file nvJPEG refuses is decoded by the CPU path there). Reading
  overlaps decoding: once it has taken chunk N, and before decoding it, the GPU thread takes chunk N+1 too if the
  rule above still wants it (never more than one chunk ahead) and submits its files to the decoder's reader
  threads (`NvJpegDecoder.read_ahead`: read, stat, sha256, header check), so they are read while chunk N decodes
  on the GPU (once nvJPEG is on for the run: not during ``auto``'s trial, whose cost stays its own chunks). If
  nvJPEG fails as a whole (a RuntimeError: CUDA out of memory, a device error), that chunk and the one read ahead
  are decoded by the CPU path, a warning is logged, and the pool decodes the rest of the run.

So where the CPU workers keep up with the model (VGA photos on 16 cores), nvJPEG stays idle; where they do not
(12 MP photos), it takes what they cannot.

Results come back one `Decoded` or `Failure` per input file, in input order; closing the generator early stops both
threads (the GPU thread finishes the chunk it decodes and waits for the reads of the one ahead, whose results are
dropped) and cancels what the pool had submitted. The pool is only used from the CPU thread, one `imap` at a time.

GPU-decoded pixels come back as host arrays (one device→host copy per chunk, on the GPU thread), so the consumers
(`embed.embed_batches` and its pinned batch buffers) are the same for both sides. The round trip it costs: 150 kB
per 224×224 image each way, at 2,700 images/s about 0.4 GB/s of a PCIe link that moves tens of GB/s, and the main
thread's per-image work (one row copied into the pinned batch) is what it does for a CPU-decoded image anyway.
Keeping them on the device would save that link traffic, not main-process CPU; it is not measured.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from indexer.decode.gpu_policy import GpuPolicy
from indexer.decode.image import decode_file
from indexer.decode.pool import DecodePool
from indexer.errors import ConfigError
from indexer.formats import EXTENSIONS
from indexer.model.lazy import cuda_expected
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec
from indexer.settings import Settings

if TYPE_CHECKING:
    import torch

    from indexer.decode.nvjpeg import NvJpegDecoder, Reads

# torch (and gpu_decode, which imports it) only where nvJPEG may run: a CPU-only start never imports them here.

__all__ = ["GPU_MODES", "Decoder", "MixedDecoder", "decoder_for", "gpu_decode_device", "gpu_mode", "open_nvjpeg"]

log = logging.getLogger(__name__)

GPU_MODES = ("auto", "on", "off")
GPU_CHUNK = 64  # JPEGs per nvJPEG call: one batched decode (VGA: ~9 ms at 7,000/s on an H200)
Result = Decoded | Failure
GpuOpener = Callable[[], "NvJpegDecoder | str"]  # the decoder, or why there is none; run on the nvJPEG thread
_Taken = tuple[list[tuple[int, Path]], "Reads"]  # a chunk taken by the GPU side (sequence numbers, paths), its reads
_JPEG_SUFFIXES = frozenset(ext for ext, name in EXTENSIONS.items() if name == "JPEG")


def gpu_decode_device(settings: Settings) -> str | None:
    """The CUDA device nvJPEG decodes on (the model's), or None for CPU decoding only. Imports torch where nvJPEG
    may run: `decoder_for` calls it on the nvJPEG thread under "auto", never on the main thread.

    ``decode.gpu``: "auto" uses nvJPEG where the model runs on CUDA and nvJPEG is available (and the run measures
    that it helps, `indexer.decode.gpu_policy`); "on" requires it (a ConfigError says why it cannot run); "off"
    never uses it."""
    if gpu_mode(settings) == "off":
        return None
    mode, device = settings.decode.gpu, settings.model.device
    from indexer.decode import nvjpeg as gpu_decode

    if not gpu_decode.available():
        if mode == "on":
            raise ConfigError("decode.gpu", '"on" needs a CUDA device and torchvision (nvJPEG); none here')
        return None
    return "cuda" if device == "auto" else device


def gpu_mode(settings: Settings) -> str:
    """``decode.gpu`` as it applies to this run, decided without importing torch: "off" where the model is not
    expected on CUDA (a ConfigError for "on" with the model on the CPU), else the setting."""
    mode, device = settings.decode.gpu, settings.model.device
    if mode == "off":
        return "off"
    if device == "cpu":
        if mode == "on":
            raise ConfigError("decode.gpu", '"on" needs the model on CUDA, but model.device is "cpu"')
        return "off"
    if mode == "auto" and device == "auto" and not cuda_expected("auto"):
        return "off"
    return mode


def decoder_for(
    settings: Settings, spec: PreprocessSpec, limits: DecodeLimits, workers: int, lookahead: int
) -> Decoder:
    """A `MixedDecoder` where nvJPEG may run (and the job is big enough for worker processes), else a `DecodePool`.

    Cheap on the calling thread: torch, torchvision, the CUDA context and nvJPEG's own start are the nvJPEG
    thread's first work (on an H200 they held the main thread 6.6 s before the first batch). "on" is checked here,
    so that a machine without nvJPEG says so at once."""
    mode = gpu_mode(settings) if workers > 0 else "off"
    if mode == "off":
        return DecodePool(spec, limits, workers=workers, lookahead=lookahead)
    if mode == "on":
        gpu_decode_device(settings)
    pool = DecodePool(spec, limits, workers=workers, lookahead=max(2 * workers, lookahead // 2))
    opener = functools.partial(open_nvjpeg, settings, spec, limits)
    chunk = max(1, min(GPU_CHUNK, lookahead // 4))
    return MixedDecoder(opener, pool, lookahead=lookahead, gpu_chunk=chunk, mode=mode)


def open_nvjpeg(settings: Settings, spec: PreprocessSpec, limits: DecodeLimits) -> NvJpegDecoder | str:
    """The nvJPEG decoder for ``settings``, or why there is none (run on the nvJPEG thread: it imports torch)."""
    device = gpu_decode_device(settings)
    if device is None:
        return "no CUDA device with torchvision's nvJPEG here"
    from indexer.decode.nvjpeg import NvJpegDecoder

    return NvJpegDecoder(spec, limits, device=device)


class MixedDecoder:
    """JPEGs decoded by ``pool`` as it has room and by ``gpu`` where they wait (see the module), other files by
    ``pool``.

    Owns the pool (closing this closes it). `gpu_files` and `cpu_files` count the files each side handled."""

    def __init__(
        self,
        gpu: NvJpegDecoder | GpuOpener,
        pool: DecodePool,
        lookahead: int,
        gpu_chunk: int = GPU_CHUNK,
        mode: str = "on",
    ) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, not {lookahead}")
        if gpu_chunk < 1:
            raise ValueError(f"gpu_chunk must be >= 1, not {gpu_chunk}")
        self.pool = pool
        self.spec, self.limits = pool.spec, pool.limits
        self.lookahead, self.gpu_chunk, self.mode = lookahead, gpu_chunk, mode
        self.gpu_files = 0
        self.cpu_files = 0
        self.decision = ""  # the last run's nvJPEG decision, as logged (`indexer.decode.gpu_policy`)
        self._closed = False
        self._opener: GpuOpener | None = gpu if callable(gpu) and not hasattr(gpu, "decode") else None
        self._gpu: NvJpegDecoder | None = None if self._opener is not None else gpu  # type: ignore[assignment]
        self._unavailable = ""
        self._stream: Any = None
        self._stream_made = False

    @property
    def gpu(self) -> NvJpegDecoder | None:
        """The nvJPEG decoder, once the nvJPEG thread made it (None before, and where it cannot run)."""
        return self._gpu

    def open_gpu(self) -> NvJpegDecoder | None:
        """The nvJPEG decoder and its CUDA stream, made on first call (on the nvJPEG thread: torch, the CUDA
        context); None where it cannot run (`unavailable` says why)."""
        if self._gpu is None and self._opener is not None and not self._unavailable:
            made = self._opener()
            if isinstance(made, str):
                self._unavailable = made
            else:
                self._gpu = made
        if self._gpu is not None and not self._stream_made:
            self._stream, self._stream_made = _side_stream(self._gpu.device), True
        return self._gpu

    @property
    def unavailable(self) -> str:
        """Why nvJPEG does not run here ("" while it may)."""
        return self._unavailable

    def give_up(self, reason: str) -> None:
        """nvJPEG is not to be tried again by this decoder."""
        self._unavailable = reason

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Close the CPU pool (see `DecodePool.close`)."""
        self._closed = True
        self.pool.close(wait)
        if self._gpu is not None:
            self._gpu.close()

    def imap(self, paths: Iterable[Path]) -> Generator[Result, None, None]:
        """Decode `paths` lazily; yields one Decoded or Failure per path, in input order.

        Closing the generator early (or dropping it) stops both sides and cancels the pool's submitted files."""
        if self._closed:
            raise RuntimeError("MixedDecoder is closed")
        return self._imap(iter(paths))

    def _imap(self, source: Iterator[Path]) -> Generator[Result, None, None]:
        run = _Run(self, source)
        try:
            while (result := run.next()) is not None:
                yield result
        finally:
            run.stop()

    def read_for_gpu(self, paths: list[Path]) -> Reads:
        """A chunk's reads submitted to the nvJPEG decoder's reader threads (returns at once)."""
        gpu = self.open_gpu()
        assert gpu is not None, "read_for_gpu without an nvJPEG decoder"
        return gpu.read_ahead(paths)

    def decode_on_gpu(self, paths: list[Path], reads: Reads | None = None) -> list[Result]:
        """One chunk through nvJPEG (on this decoder's CUDA stream), its files read now or already (``reads``, from
        `read_for_gpu`); pixels copied back to host arrays."""
        gpu = self.open_gpu()
        assert gpu is not None, "decode_on_gpu without an nvJPEG decoder"
        read = gpu.read(paths) if reads is None else reads.result()
        if self._stream is None:
            results, stacked = gpu.decode_reads(paths, read)
            host = stacked.numpy()
        else:
            import torch

            with torch.cuda.stream(self._stream):
                results, stacked = gpu.decode_reads(paths, read)
                host = stacked.cpu().numpy()  # waits for this stream only
        out: list[Result] = []
        row = 0
        for result in results:
            if isinstance(result, Decoded):
                out.append(Decoded(result.meta, host[row]))
                row += 1
            else:
                out.append(result)
        return out


def _side_stream(device: torch.device) -> Any:
    """A CUDA stream of its own for ``device`` (None on the CPU): nvJPEG's work and its copy back to the host wait
    for nothing the model queued on the default stream."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


class _Run:
    """The state of one `MixedDecoder.imap` call: the window of files taken, two queues and two threads."""

    def __init__(self, owner: MixedDecoder, source: Iterator[Path]) -> None:
        self.owner = owner
        self.source = source
        self.cond = threading.Condition()
        self.jpegs: deque[tuple[int, Path]] = deque()  # either side takes these
        self.others: deque[tuple[int, Path]] = deque()  # the CPU pool only
        self.done: dict[int, Result] = {}
        self.head = 0  # the next sequence number to yield
        self.tail = 0  # the next sequence number to give out
        self.exhausted = False
        self.stopped = False
        self.error: BaseException | None = None
        self.refill = max(1, min(32, owner.lookahead // 4))  # take input in small batches, not one file a time
        window = max(2 * owner.gpu_chunk, min(256, owner.lookahead))
        # Waits among the first half look-ahead + 1 are not the model's: the workers start, and the pipeline gathers
        # its first two batches while the network may still be loading (the third is taken once the model ran).
        warmup = max(window, owner.lookahead // 2 + 1)
        self.policy = GpuPolicy(owner.mode, window=window, skip=owner.lookahead, warmup=warmup)
        self.threads = [
            threading.Thread(target=self._guard, args=(self._gpu_loop,), name="nvjpeg", daemon=True),
            threading.Thread(target=self._guard, args=(self._cpu_loop,), name="decode-pool-feed", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    # -- the consumer (the generator's thread) ---------------------------------------------------------------

    def next(self) -> Result | None:
        """The next result in input order; None once every input file was yielded."""
        self._fill()
        with self.cond:
            waited_since = None if self.head in self.done else time.perf_counter()
            while self.head not in self.done:
                if self.error is not None:
                    raise self.error
                if self.head == self.tail and self.exhausted:
                    return None
                self.cond.notify_all()  # the file waited for may be queued: the GPU side takes it
                self.cond.wait()
            result = self.done.pop(self.head)
            self.head += 1
            allowed = self.policy.allowed
            self.policy.consumed(0.0 if waited_since is None else time.perf_counter() - waited_since)
            if self.policy.allowed != allowed:
                self.cond.notify_all()
            self.owner.decision = self.policy.decision
            return result

    def _fill(self) -> None:
        if self.exhausted:
            return
        room = self.owner.lookahead - (self.tail - self.head)
        if room < self.refill and self.tail > self.head:
            return
        taken = []
        for path in self.source:
            taken.append(path)
            if len(taken) >= room:
                break
        with self.cond:
            for path in taken:
                queue = self.jpegs if path.suffix.lower() in _JPEG_SUFFIXES else self.others
                queue.append((self.tail, path))
                self.tail += 1
            if len(taken) < room:
                self.exhausted = True
            self.cond.notify_all()

    def stop(self) -> None:
        """Stop both threads (each finishes the chunk it is on) and wait for them."""
        with self.cond:
            self.stopped = True
            self.jpegs.clear()
            self.others.clear()
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()

    # -- the two sides -----------------------------------------------------------------------------------------

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:
            log.debug("decode thread failed", exc_info=True)
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _put(self, seqs: list[int], results: list[Result]) -> None:
        with self.cond:
            self.done.update(zip(seqs, results, strict=True))
            if self.head in self.done:
                self.cond.notify_all()

    def _gpu_wanted(self) -> bool:
        """Whether the GPU side takes JPEGs now: a chunk's worth waits (the CPU pool is full), the oldest waiting
        one is the next to yield, or the input has ended."""
        jpegs = self.jpegs
        if not jpegs or not self.policy.allowed:
            return False
        return len(jpegs) >= self.owner.gpu_chunk or jpegs[0][0] == self.head or self.exhausted

    def _gpu_done(self) -> bool:
        """Whether the GPU side has nothing more to do in this run."""
        return self.stopped or self.policy.state == "off" or (self.exhausted and not self.jpegs)

    def _gpu_loop(self) -> None:
        """Chunk after chunk through nvJPEG, the next one's files read while the current one decodes."""
        held: deque[_Taken] = deque()  # taken, reads submitted, not yet decoded: the current chunk, one ahead at most
        try:
            while not self.stopped:
                if not held and (taken := self._take(wait=True)) is not None:
                    held.append(taken)
                if not held:
                    return
                # Read the next chunk while held[0] decodes, once nvJPEG is on for the run: during auto's trial a
                # chunk taken ahead is one the CPU workers cannot take, so the trial would cost the run more.
                if self.policy.state == "on" and (ahead := self._take(wait=False)) is not None:
                    held.append(ahead)
                if not self._decode(held[0][0], held[0][1]):
                    self._fall_back(held)
                    return
                held.popleft()
        finally:
            for _, reads in held:  # stopped or failed: no read goes on after the run (results dropped)
                reads.result()

    def _take(self, wait: bool) -> _Taken | None:
        chunk = self._next_chunk(wait)
        return None if chunk is None else (chunk, self.owner.read_for_gpu([path for _, path in chunk]))

    def _decode(self, chunk: list[tuple[int, Path]], reads: Reads) -> bool:
        """One chunk through nvJPEG, its results put; False where nvJPEG failed as a whole (nothing put)."""
        try:
            results = self.owner.decode_on_gpu([path for _, path in chunk], reads)
        except RuntimeError as exc:  # CUDA out of memory, a device error: the CPU decodes the rest of this run
            log.warning("nvJPEG decoding failed, the CPU decodes the rest of this run: %s", exc)
            return False
        self.owner.gpu_files += len(chunk)
        self.policy.gpu_chunk_done()
        self._put([seq for seq, _ in chunk], results)
        return True

    def _fall_back(self, held: deque[_Taken]) -> None:
        """The chunks nvJPEG holds (the failed one, the one read ahead) decoded by the CPU path, in order."""
        owner = self.owner
        while held:
            chunk, _ = held[0]
            self._put([seq for seq, _ in chunk], [decode_file(path, owner.spec, owner.limits) for _, path in chunk])
            held.popleft()[1].result()

    def _next_chunk(self, wait: bool = True) -> list[tuple[int, Path]] | None:
        """The next chunk of JPEGs for nvJPEG, once it is wanted (None: nothing more in this run; without ``wait``,
        None also where it is not wanted now). nvJPEG is started (torch, the CUDA context) only then: a run where the
        model is the bottleneck never starts it."""
        while True:
            with self.cond:
                while wait and not self._gpu_done() and not self._gpu_wanted():
                    self.cond.wait()
                if not self._gpu_wanted():  # stopped, off, or the input ended and no JPEG is left
                    return None
                if self.owner.gpu is not None:
                    return [self.jpegs.popleft() for _ in range(min(self.owner.gpu_chunk, len(self.jpegs)))]
            if self._open() is None:  # outside the lock: the CPU side goes on meanwhile
                return None

    def _open(self) -> object | None:
        try:
            gpu = self.owner.open_gpu()
        except Exception as exc:  # a broken CUDA or torchvision install: the CPU decodes, with a warning
            log.warning("nvJPEG could not start, the CPU decodes: %s", exc)
            self.owner.give_up(f"nvJPEG could not start: {exc}")
            gpu = None
        if gpu is None:
            self.policy.unavailable(self.owner.unavailable)
            self.owner.decision = self.policy.decision
            with self.cond:
                self.cond.notify_all()
        return gpu

    def _cpu_loop(self) -> None:
        """One `DecodePool.imap` over the queues for the whole run (see `_cpu_source`)."""
        given: deque[int] = deque()  # sequence numbers handed to the pool, not yet back
        results = self.owner.pool.imap(self._cpu_source(given))
        try:
            for result in results:
                self.owner.cpu_files += 1
                self._put([given.popleft()], [result])
                if self.stopped:
                    return
        finally:
            results.close()

    def _cpu_source(self, given: deque[int]) -> Iterator[Path | None]:
        """The pool's input: queued files (non-JPEGs first), oldest first. With nothing queued it yields None ("none
        for now") while the pool has files in flight, so it goes on collecting them, and blocks only while it has
        none (so nothing the consumer waits for is held up); it ends with the input or when stopped."""
        while True:
            with self.cond:
                while True:
                    if self.stopped:
                        return
                    queue = self.others or self.jpegs
                    if queue or given or self.exhausted:
                        break
                    self.cond.wait()
                if not queue:
                    if self.exhausted and not given:
                        return
                    item = None
                else:
                    seq, item = queue.popleft()
                    given.append(seq)
            yield item


Decoder = DecodePool | MixedDecoder
