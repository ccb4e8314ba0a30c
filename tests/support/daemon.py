"""A real `indexer watch` process for tests: start it, ask its app, wait for what it stores, stop or kill it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tests.fixtures.shapes import draw_shape
from tests.support.clirun import INDEXER, MODEL

BASE_ENV = {
    "INDEXER_WATCH__STABLE_SECONDS": "0.3",
    "INDEXER_WATCH__RESCAN_INTERVAL": "0",  # events must do the work, not a periodic rescan
    "INDEXER_STORE__OPTIMIZE_AFTER": "1000000",  # exact search: every point comes back
}
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(every)


def write_png(path: Path, seed: int, color: str = "red", shape: str = "circle", size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(color, shape, np.random.default_rng(seed), size).save(path, "PNG")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Daemon:
    """One `indexer watch` process and its control endpoint."""

    def __init__(self, roots: list[Path], store: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.store, self.log = store, log
        command = [INDEXER, "watch", *map(str, roots), "--store", str(store), *MODEL, "--workers", "1", *args]
        self.proc = self._spawn(command, {**os.environ, **BASE_ENV, **(env or {})})
        self.url = wait_for("the daemon to advertise itself", self._advert, timeout=60)
        wait_for("the start-up reconciliation", lambda: self.health().get("phase") == "watching", timeout=60)

    def _spawn(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=out, env=env)

    def _advert(self) -> str | None:
        assert self.proc.poll() is None, self.text()
        try:
            data = json.loads((self.store / "daemon.json").read_text())
        except (OSError, ValueError):
            return None
        return str(data["url"]) if data["pid"] == self.proc.pid else None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> Any:
        """A GET of the daemon's app; /status is the control route `indexer status` asks."""
        path = "/control/status" if path == "/status" else path
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def health(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.get("/healthz")
        except OSError:
            return {}
        return result

    def count(self) -> int:
        return int(self.get("/status")["images"])

    def points(self) -> dict[str, dict[str, Any]]:
        """Every stored point's payload, by path (through the daemon's search route for the CLI)."""
        status = self.get("/status")
        query = {"texts": ["a shape"], "limit": 10_000}
        body = json.dumps({"store": str(self.store), "model": status["model"], "query": query}).encode()
        headers = {"Content-Type": "application/json"}  # the app refuses bodies not declared as JSON
        request = urllib.request.Request(self.url + "/control/search", data=body, method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            hits = json.loads(response.read())["hits"]
        return {h["payload"]["path"]: h["payload"] for h in hits}

    def metric(self, name: str) -> float:
        """A sample's value by its exact name (labels included), 0 when absent."""
        for line in self.get("/metrics").splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return 0.0

    def wait_paths(self, expected: set[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        def probe() -> dict[str, dict[str, Any]] | None:
            points = self.points()
            return points if set(points) == expected else None

        try:
            return wait_for(f"the store to hold exactly {len(expected)} files", probe, timeout)
        except AssertionError:
            got = set(self.points())
            raise AssertionError(f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_cli(*args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([INDEXER, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*.png") if not any(part.startswith(".") for part in p.parts)}
