"""`indexer watch`: time from a file's close to it being searchable, for single files and for a burst.

Runs the real daemon (`indexer watch`, a subprocess, default settings: max_wait 0.5 s) with the learned test model
on the CPU and the embedded store, then:

- single files: writes one PNG at a time (a pause between them so that each is its own batch), takes the time right
  after the file is closed, and polls the daemon's /status until the store counts it (every 5 ms);
- a burst: writes N PNGs as fast as it can (the images are drawn beforehand), takes each file's close time, waits
  until all are counted, and reads each file's ``indexed_at`` (set just before its batch is upserted) back from
  the store: per-file latency = indexed_at - close, throughput = N / (last searchable - first close).

    python -m bench.bench_watch [--singles 20] [--burst 1000] [--size 128]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tests.fixtures.shapes import CLASSES, draw_shape

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "shapes-clip" / "config.json"
INDEXER = str(Path(sys.executable).parent / "indexer")


def png(index: int, size: int) -> bytes:
    color, shape = CLASSES[index % len(CLASSES)]
    buf = io.BytesIO()
    draw_shape(color, shape, np.random.default_rng([99, index]), size).save(buf, "PNG")
    return buf.getvalue()


class Watch:
    """The daemon under test."""

    def __init__(self, root: Path, store: Path, log: Path, batch: int) -> None:
        self.store = store
        args = [INDEXER, "watch", str(root), "--store", str(store), "--model", str(MODEL), "--device", "cpu"]
        args += ["--batch-size", str(batch), "--workers", "1"]
        env = {**os.environ, "INDEXER_WATCH__RESCAN_INTERVAL": "0", "INDEXER_STORE__OPTIMIZE_AFTER": "10000000"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, env=env)
        self.url = self._wait(self._advert, 120)
        self._wait(lambda: self.get("/healthz").get("phase") == "watching", 120)

    def _advert(self) -> str | None:
        try:
            return str(json.loads((self.store / "daemon.json").read_text())["url"])
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def _wait(probe: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := probe()):
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not get ready")
            time.sleep(0.05)
        return value

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def count(self) -> int:
        return int(self.get("/status?failures=0")["images"])

    def payloads(self) -> dict[str, dict[str, Any]]:
        model = self.get("/status?failures=0")["model"]
        query = {"texts": ["a shape"], "limit": 1_000_000}
        body = json.dumps({"store": str(self.store), "model": model, "query": query}).encode()
        request = urllib.request.Request(self.url + "/search", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            return {h["payload"]["path"]: h["payload"] for h in json.loads(response.read())["hits"]}

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def singles(watch: Watch, folder: Path, count: int, size: int) -> list[float]:
    folder.mkdir()
    latencies = []
    for i in range(count):
        data = png(10_000 + i, size)
        before = watch.count()
        with open(folder / f"single-{i:03d}.png", "wb") as fh:
            fh.write(data)
        closed = time.perf_counter()
        while watch.count() == before:
            time.sleep(0.005)
        latencies.append(time.perf_counter() - closed)
        time.sleep(0.3)
    return latencies


def burst(watch: Watch, folder: Path, count: int, size: int) -> tuple[list[float], float, float]:
    images = [png(i, size) for i in range(count)]
    folder.mkdir()
    before = watch.count()
    closed: dict[str, float] = {}
    for i, data in enumerate(images):
        path = folder / f"burst-{i:04d}.png"
        with open(path, "wb") as fh:
            fh.write(data)
        closed[str(path)] = time.time()
    written = time.time()
    while watch.count() < before + count:
        time.sleep(0.01)
    done = time.time()
    stored = watch.payloads()
    latencies = [float(stored[p]["indexed_at"]) - t for p, t in closed.items()]
    first = min(closed.values())
    return latencies, count / (done - first), written - first


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "root").mkdir()
        watch = Watch(base / "root", base / "store", base / "daemon.log", args.batch)
        try:
            single = percentiles(singles(watch, base / "root" / "singles", args.singles, args.size))
            latencies, throughput, writing = burst(watch, base / "root" / "burst", args.burst, args.size)
        finally:
            code = watch.stop()
        result = {
            "machine": machine(),
            "single": {k: round(v, 3) for k, v in single.items()},
            "burst": {k: round(v, 3) for k, v in percentiles(latencies).items()},
            "burst_files": args.burst,
            "burst_written_in_s": round(writing, 2),
            "burst_throughput_per_s": round(throughput, 1),
            "daemon_exit": code,
        }
    print(json.dumps(result, indent=2))
    print(
        f"\n| case | p50 | p95 | max |\n|---|---|---|---|\n"
        f"| single file ({args.singles}x) | {single['p50']:.2f} s | {single['p95']:.2f} s | {single['max']:.2f} s |\n"
        f"| burst of {args.burst} | {result['burst']['p50']:.2f} s | {result['burst']['p95']:.2f} s | "
        f"{result['burst']['max']:.2f} s |\n\nburst throughput: {throughput:.0f} files/s"
    )


if __name__ == "__main__":
    main()
