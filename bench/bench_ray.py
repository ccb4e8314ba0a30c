"""`indexer embed` in one process against `indexer embed --ray`, on the same images, model and core count.

The same folder of small PNGs goes through the single-process pipeline (`run_embed`: decode worker pool +
batched inference) and through the Ray engine (`run_ray_embed`: CPU decode tasks → embedding actors → Parquet
parts) on a local Ray started with the same number of CPUs. Ray's start-up (``ray.init``) is timed and reported
apart, not inside the Ray throughput. Prints both throughputs and the ratio (goal: Ray ≥ 0.8x single-process).

    python -m bench.bench_ray [--count 2000] [--cpus 2] [--model tests/fixtures/shapes-clip/config.json]

On a machine with GPUs, ``--gpus N`` gives the local Ray N GPUs and runs four actors per GPU (0.25 each), the line
for multi-GPU scaling; the single-process path then uses one GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "fixtures" / "shapes-clip" / "config.json"


def make_images(folder: Path, count: int, size: int) -> None:
    from tests.fixtures.shapes import write_dataset

    if len(list(folder.glob("*.png"))) != count:
        write_dataset(folder, count, seed=0, size=size)


def settings_for(store: Path, model: str, device: str, cpus: int, batch: int) -> object:
    from indexer.settings import load_settings

    overrides = {
        "store": {"dir": store},
        "model": {"name": model, "device": device, "batch_size": batch, "pretrained": "random"},
        "decode": {"workers": cpus},
    }
    return load_settings(None, overrides)


def single_process(images: Path, out: Path, settings: object) -> float:
    from indexer.ingest.pipeline import run_embed
    from indexer.model.lazy import LazyModel

    model = LazyModel(settings.model)  # type: ignore[attr-defined]
    model.get()  # built before the clock, as the Ray actors build theirs before their first part
    start = time.perf_counter()
    summary = run_embed([images], out, settings, model)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    assert summary.indexed > 0 and summary.failed == 0, summary
    return seconds


def on_ray(images: Path, out: Path, settings: object, cpus: int, gpus: int, part_size: int) -> tuple[float, float]:
    import ray

    from indexer.distributed.engine import RayOptions, run_ray_embed

    start = time.perf_counter()
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    startup = time.perf_counter() - start
    options = RayOptions(part_size=part_size, num_gpus_per_worker=0.25 if gpus else 0.0,
                         workers=4 * gpus if gpus else 1, actor_cpus=0.25, decode_cpus=1.0)  # fmt: skip
    try:
        start = time.perf_counter()
        summary = run_ray_embed([images], out, settings, options)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    assert summary.indexed > 0 and summary.failed == 0, summary
    return startup, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--model", default=str(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--part-size", type=int, default=256)
    args = parser.parse_args()

    data = ROOT / "bench" / "data" / f"shapes-{args.count}-{args.size}"
    make_images(data, args.count, args.size)
    device = "cuda" if args.gpus else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp) / "store", args.model, device, args.cpus, args.batch)
        single = single_process(data, Path(tmp) / "single.parquet", settings)
        startup, distributed = on_ray(data, Path(tmp) / "parts", settings, args.cpus, args.gpus, args.part_size)
    rate_single, rate_ray = args.count / single, args.count / distributed
    print(f"images: {args.count} PNG {args.size}x{args.size}, model {Path(args.model).parent.name or args.model}, "
          f"{args.cpus} CPUs, {args.gpus} GPUs")  # fmt: skip
    print(f"single process : {single:7.2f} s  {rate_single:8.1f} images/s")
    print(f"ray            : {distributed:7.2f} s  {rate_ray:8.1f} images/s  (+ ray.init {startup:.2f} s, apart)")
    print(f"ratio ray/single: {rate_ray / rate_single:.2f}x  (goal >= 0.8x)")


if __name__ == "__main__":
    main()
