"""When the nvJPEG side of `indexer.decode.mixed` may take work: ``decode.gpu = "auto"`` decides from what the run
measures, so that it is never slower than ``"off"``.

nvJPEG only helps where decoding is the bottleneck (12 MP photos on a few cores); where the model is (VGA photos on
16 cores) its kernels and copies compete with the model for the GPU and the main process's time, and the run gets
slower (measured on an H200: 1,678 against 2,079 images/s). So under ``auto`` the run starts on the CPU decode pool
alone and measures:

1. **Does the model wait on decoding?** Over a window of ``window`` results (from the first time the consumer — the
   model's loop — had to wait once ``warmup`` results are in, so that neither the decode workers' start nor the
   batches gathered while the network still loads are counted; or after the look-ahead filled while the model
   loaded was eaten), the share of the consumer's time spent waiting for the next decoded image. A run shorter than
   that never uses nvJPEG under "auto". Below ``min_wait`` (10%) the CPU keeps up: nvJPEG stays
   off for the run.
2. **Is nvJPEG faster?** Otherwise nvJPEG is tried for another window (counted from its first decoded chunk, so its
   start-up is not held against it), and kept only if the consumer's rate is at least ``min_gain`` (1.05x) the
   CPU-only window's; else it is off for the rest of the run.

Each decision is logged at INFO with its figures. ``"on"`` lets nvJPEG take work from the first file (no
measuring); ``"off"`` never builds it. The rule is pure arithmetic on the consumer's clock: the tests drive it with
a CPU stand-in for nvJPEG.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GpuPolicy", "Window"]

log = logging.getLogger(__name__)

MIN_WAIT = 0.10  # the model waiting on decode less than this share of its time: decoding keeps up
MIN_GAIN = 1.05  # nvJPEG kept only when the run is at least this much faster with it


@dataclass(slots=True)
class Window:
    """Results consumed, seconds they took and seconds of it the consumer waited for decoding."""

    started: float
    results: int = 0
    waited: float = 0.0

    def rate(self, now: float) -> float:
        return self.results / max(now - self.started, 1e-9)

    def wait_share(self, now: float) -> float:
        return self.waited / max(now - self.started, 1e-9)


class GpuPolicy:
    """Whether the GPU side may take work now (`allowed`), fed by the consumer (`consumed`) and the GPU side
    (`gpu_ready`, `gpu_chunk_done`, `unavailable`). States: "measure" → "off" or "trial" → "on" or "off"; mode
    "on" starts (and stays) "on". Thread-safe."""

    def __init__(
        self, mode: str, window: int, skip: int, warmup: int = 0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if mode not in ("auto", "on"):
            raise ValueError(f"GpuPolicy mode must be 'auto' or 'on', not {mode!r}")
        self.mode = mode
        self.state = "on" if mode == "on" else "measure"
        self.window, self.skip, self.clock = max(1, window), max(0, skip), clock
        self.warmup = min(max(0, warmup), self.skip)  # waits among the first results are the pool starting up
        self.decision = "nvJPEG on (decode.gpu = on)" if mode == "on" else ""
        self._seen = 0
        self._cpu: Window | None = None
        self._cpu_rate = 0.0
        self._trial: Window | None = None
        self._lock = threading.Lock()

    @property
    def allowed(self) -> bool:
        return self.state in ("on", "trial")

    @property
    def settled(self) -> bool:
        """True once the decision for this run is taken (nothing left to measure)."""
        return self.state in ("on", "off")

    def consumed(self, waited: float) -> None:
        """One result handed to the consumer, which waited ``waited`` seconds for it."""
        with self._lock:
            if self.settled:
                return
            now = self.clock()
            self._seen += 1
            if self.state == "measure":
                self._measure(waited, now)
            elif self._trial is not None:
                self._count_trial(waited, now)

    def gpu_chunk_done(self) -> None:
        """The GPU side delivered a chunk: the trial window starts at its first one."""
        with self._lock:
            if self.state == "trial" and self._trial is None:
                self._trial = Window(self.clock())

    def unavailable(self, reason: str) -> None:
        """nvJPEG cannot run here: off for the run, whatever was measured."""
        with self._lock:
            self._settle("off", f"nvJPEG off: {reason}")

    def _measure(self, waited: float, now: float) -> None:
        if self._cpu is None:
            if self._seen <= self.warmup or (waited <= 0 and self._seen <= self.skip):
                return  # the decode workers starting, or the model eating what was decoded while it loaded
            self._cpu = Window(now - waited)
        self._cpu.results += 1
        self._cpu.waited += waited
        if self._cpu.results < self.window:
            return
        share, rate = self._cpu.wait_share(now), self._cpu.rate(now)
        seconds = now - self._cpu.started
        if share < MIN_WAIT:
            self._settle("off", f"nvJPEG off: the model waited on decoding {share:.0%} of {seconds:.1f} s")
            return
        self._cpu_rate = rate
        self.state = "trial"
        log.info(
            "decode.gpu = auto: the model waited on decoding %.0f%% of %.1f s (%.0f images/s): trying nvJPEG",
            100 * share,
            seconds,
            rate,
        )

    def _count_trial(self, waited: float, now: float) -> None:
        assert self._trial is not None
        self._trial.results += 1
        self._trial.waited += waited
        if self._trial.results < self.window:
            return
        rate = self._trial.rate(now)
        figures = f"{rate:.0f} images/s against {self._cpu_rate:.0f} with the CPU alone"
        if rate >= MIN_GAIN * self._cpu_rate:
            self._settle("on", f"nvJPEG on: {figures}")
        else:
            self._settle("off", f"nvJPEG off: {figures}")

    def _settle(self, state: str, decision: str) -> None:
        if self.settled:
            return
        self.state, self.decision = state, decision
        log.info("decode.gpu = auto: %s", decision)
