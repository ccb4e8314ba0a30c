"""Running the real ``indexer`` console script (the one installed beside this Python) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import SHAPES_MODEL

INDEXER = str(Path(sys.executable).parent / "indexer")
MODEL = ["--model", str(SHAPES_MODEL), "--device", "cpu"]


def run(*args: str, check: int | None = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``indexer ARGS``; with ``check``, assert its exit code (showing its output when it differs)."""
    proc = subprocess.run(
        [INDEXER, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_json(*args: str, check: int | None = 0) -> Any:
    """Run ``indexer ARGS --json`` and parse what it printed."""
    return json.loads(run(*args, "--json", check=check).stdout)
