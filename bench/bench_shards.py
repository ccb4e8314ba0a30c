"""Decoding a WebDataset shard in one process: one thread against several (`shards.decode_shard(threads=N)`).

Packs 12 MP photo-like JPEGs (bench_embed's, cached under bench/data/) into one tar shard with a caption per sample,
then decodes it to 224 px model input with 1 thread and with N, interleaved, and prints images/s of each and the
ratio. The tar is read on the calling thread in both; only decoding runs on the threads.

    python -m bench.bench_shards [--count 48] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from pathlib import Path

from bench.bench_embed import make_photos

DATA = Path(__file__).parent / "data"


def make_shard(count: int) -> Path:
    shard = DATA / f"shard-12mp-{count}.tar"
    if shard.exists():
        return shard
    photos = make_photos(DATA / f"jpeg-12mp-{count}", count)
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i, photo in enumerate(photos):
            tf.add(photo, arcname=f"{i:09d}.jpg")
            caption = f"photo {i}".encode()
            info = tarfile.TarInfo(f"{i:09d}.txt")
            info.size = len(caption)
            tf.addfile(info, io.BytesIO(caption))
    os.replace(tmp, shard)
    return shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from indexer.records import DecodeLimits, PreprocessSpec
    from indexer.sources.shards import decode_shard, find_shards

    entry = find_shards([make_shard(args.count)])[0]
    best: dict[int, float] = {}
    for _ in range(args.repeat):
        for threads in (1, args.threads):
            start = time.perf_counter()
            n = sum(1 for _ in decode_shard(entry, PreprocessSpec(), DecodeLimits(), threads=threads))
            best[threads] = max(best.get(threads, 0.0), n / (time.perf_counter() - start))
    print(f"one shard of {args.count} JPEGs of 4000x3000, decoded to 224 px, best of {args.repeat}:")
    for threads, rate in best.items():
        print(f"  {threads} thread(s): {rate:6.1f} images/s")
    print(f"  ratio: {best[args.threads] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
