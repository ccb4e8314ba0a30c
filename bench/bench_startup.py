"""The start-up timeline of a whole ``indexer embed`` / ``indexer index`` process: when each step is reached,
counted from the moment the process was launched, first run ever (empty cache) and second run.

The child runs the real CLI (`indexer.cli.main.main`) with class-level timers around the steps (bench only):
settings built, the decoder made (and how long that held the main thread), the first file decoded, the network
built (imports included), the image tower loaded, the first and last batch embedded, the command returned; the
parent adds the process's exit.

    python -m bench.bench_startup [--count 64] [--command embed] [--model tests/fixtures/shapes-clip/config.json]
        [--weights FILE] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).parent.parent
EVENTS: list[tuple[str, float]] = []


def _mark(what: str) -> None:
    EVENTS.append((what, time.time()))


def _wrap(owner: Any, name: str, before: str | None, after: str | None, once: bool = True) -> None:
    real = getattr(owner, name)
    seen: set[str] = set()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before and not (once and before in seen):
            seen.add(before)
            _mark(before)
        result = real(*args, **kwargs)
        if after and not (once and after in seen):
            seen.add(after)
            _mark(after)
        return result

    setattr(owner, name, wrapped)


def _first_yield(owner: Any, name: str, what: str) -> None:
    real: Callable[..., Any] = getattr(owner, name)

    def imap(self: Any, paths: Any) -> Any:
        first = True
        for item in real(self, paths):
            if first:
                _mark(what)
                first = False
            yield item

    setattr(owner, name, imap)


def child(argv: list[str]) -> None:
    """Run the CLI with the timers; print the events as JSON (absolute times) on the last line of stdout."""
    _mark("interpreter up, bench imported")
    from indexer.cli import main as cli

    _mark("indexer.cli.main imported")
    from indexer.decode.mixed import MixedDecoder
    from indexer.decode.pool import DecodePool
    from indexer.model import lazy

    main_thread = threading.main_thread()
    for cls in (DecodePool, MixedDecoder):
        real_init = cls.__init__

        def init(self: Any, *a: Any, _real: Any = real_init, **k: Any) -> None:
            start = time.time()
            _real(self, *a, **k)
            if threading.current_thread() is main_thread and not any(e[0].startswith("decoder made") for e in EVENTS):
                EVENTS.append((f"decoder made (held the main thread {1000 * (time.time() - start):.0f} ms)", start))

        cls.__init__ = init  # type: ignore[method-assign]
        _first_yield(cls, "imap", "first file decoded")
    _wrap(cli, "load_settings", None, "settings built")
    real_build = lazy.LazyModel._build

    def build(self: Any) -> Any:  # the ClipModel's own steps timed on the instance: torch is not imported here
        _mark("network build started (torch, open_clip imports)")
        clip = real_build(self)
        _mark("network built")
        _wrap(clip, "load", None, "image tower loaded")
        real_encode = clip.encode_pixels

        def encode(pixels: Any) -> Any:
            out = real_encode(pixels)
            _mark(
                "first batch embedded"
                if not any(e[0] == "first batch embedded" for e in EVENTS)
                else "last batch embedded"
            )
            return out

        clip.encode_pixels = encode
        return clip

    lazy.LazyModel._build = build  # type: ignore[method-assign]
    code = cli.main(argv)
    _mark("command returned")
    last = [e for e in EVENTS if e[0] == "last batch embedded"][-1:]
    events = [e for e in EVENTS if e[0] != "last batch embedded"] + last
    sys.stdout.flush()
    print("\n" + json.dumps({"code": code, "events": events}), flush=True)
    os._exit(code)


def run_once(argv: list[str], env: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    """Launch the child; (events relative to launch, process wall time)."""
    launched = time.time()
    cmd = [sys.executable, "-m", "bench.bench_startup", "--child", "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    wall = time.time() - launched
    if out.returncode not in (0, 1):
        raise SystemExit(f"the child failed ({out.returncode}):\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    events = sorted(((what, at - launched) for what, at in got["events"]), key=lambda e: e[1])
    return events, wall


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--command", choices=["embed", "index"], default="embed")
    parser.add_argument("--model", default=str(REPO / "tests" / "fixtures" / "shapes-clip" / "config.json"))
    parser.add_argument("--weights", default="")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from bench.gpu_check import make_jpegs

    folder = make_jpegs(REPO / "bench" / "data" / "gpu-vga", args.count, (640, 480))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/cache", "PYTHONPATH": str(REPO)}
        model = ["--model", args.model, "--device", args.device] + (["--weights", args.weights] if args.weights else [])
        for run in ("first run (empty cache)", "second run"):
            target = ["-o", f"{tmp}/out.parquet"] if args.command == "embed" else ["--store", f"{tmp}/s-{run[:5]}"]
            events, wall = run_once([args.command, str(folder), *target, *model, "--json"], env)
            print(f"{args.command} of {args.count} VGA JPEGs, {run}: {wall:.2f} s")
            for what, at in events:
                print(f"  {at:6.2f} s  {what}")
            print(f"  {wall:6.2f} s  process exited")


if __name__ == "__main__":
    main()
