"""The mixed decode stage's own cost on the host: `MixedDecoder` vs the bare `DecodePool`, model a no-op (here only).

Both feed `embed.embed_batches` with a no-op encoder on the same JPEGs. The GPU side is `NvJpegDecoder(device=
"cpu")` (torchvision's libjpeg on the nvJPEG thread, the stand-in where there is no GPU): its own CPU time (its
decode step, `decode_reads`, measured on that thread; the files are read on its reader threads, the next chunk's
while one decodes) is taken out of the main process's, so what is left is the mixed stage's plumbing (queues, the
feeder thread, ordering) plus what the bare pool costs (torch runs on one thread here, so that the stand-in's work
is all on its own thread). Prints images/s, main-process CPU ms per image and the
split. Figures for nvJPEG itself need a GPU (bench/gpu_check.sh).

    python -m bench.bench_mixed [--vga 300] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

# torch is imported inside the functions (decode workers import this __main__ module).

DATA = Path(__file__).parent / "data"


def _no_op(pixels: np.ndarray) -> np.ndarray:
    return np.zeros((len(pixels), 4), np.float32)


def run(decoder: Any, paths: list[Path], batch: int) -> tuple[float, float]:
    """(seconds, main-process CPU seconds) of decoder.imap → embed_batches with a no-op encoder."""
    from indexer.ingest.embed import embed_batches

    wall, cpu = time.perf_counter(), time.process_time()
    for _ in embed_batches(decoder.imap(paths), _no_op, batch):
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    import torch

    from bench.bench_embed import make_photos
    from indexer.decode.mixed import MixedDecoder
    from indexer.decode.nvjpeg import NvJpegDecoder
    from indexer.decode.pool import DecodePool
    from indexer.records import DecodeLimits, PreprocessSpec

    torch.set_num_threads(1)  # the stand-in's work all on its own thread, so thread_time measures all of it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vga", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    paths = make_photos(DATA / "feed-vga", args.vga, (640, 480))
    spec, limits = PreprocessSpec(), DecodeLimits()
    lookahead = 2 * args.batch

    class TimedNvJpeg(NvJpegDecoder):
        """The stand-in, counting its own thread's CPU time."""

        cpu = 0.0

        def decode_reads(self, chunk: list[Path], read: Any) -> Any:
            start = time.thread_time()
            try:
                return super().decode_reads(chunk, read)
            finally:
                TimedNvJpeg.cpu += time.thread_time() - start

    n = len(paths)
    print(f"{n} VGA JPEGs, {args.workers} workers, batch {args.batch}, best of {args.repeat}", flush=True)
    with DecodePool(spec, limits, workers=args.workers, lookahead=lookahead) as pool:
        run(pool, paths[:8], args.batch)  # workers started before the clock
        best = min(run(pool, paths, args.batch) for _ in range(args.repeat))
    print(f"  DecodePool alone : {n / best[0]:7.1f} images/s, main-process CPU {1e3 * best[1] / n:.3f} ms/image")
    gpu = TimedNvJpeg(spec, limits, device="cpu")
    pool = DecodePool(spec, limits, workers=args.workers, lookahead=max(2 * args.workers, lookahead // 2))
    with MixedDecoder(gpu, pool, lookahead=lookahead, gpu_chunk=max(1, min(64, lookahead // 4))) as mixed:
        run(mixed, paths[:8], args.batch)
        rows = []
        for _ in range(args.repeat):
            TimedNvJpeg.cpu, mixed.gpu_files, mixed.cpu_files = 0.0, 0, 0
            seconds, cpu = run(mixed, paths, args.batch)
            rows.append((seconds, cpu, TimedNvJpeg.cpu, mixed.gpu_files, mixed.cpu_files))
        seconds, cpu, stand_in, on_gpu, on_cpu = min(rows)
    print(
        f"  MixedDecoder     : {n / seconds:7.1f} images/s, main-process CPU {1e3 * cpu / n:.3f} ms/image, of which"
        f" the stand-in's decoding {1e3 * stand_in / n:.3f} ({1e3 * stand_in / max(on_gpu, 1):.2f} ms per file it"
        f" took), the rest {1e3 * (cpu - stand_in) / n:.3f}; split: stand-in {on_gpu} / CPU pool {on_cpu}"
    )


if __name__ == "__main__":
    main()
