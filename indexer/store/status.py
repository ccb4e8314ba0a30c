"""The status of a store, as `indexer status --json` prints it and the watch daemon's control server answers it
(the daemon adds its own state under "daemon": ``{**store_status(store, n), "daemon": ...}``). Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore


def store_status(store: VectorStore, failures: int) -> dict[str, Any]:
    """Where the store is, its model and dim, how many images and failures, and the newest ``failures`` of them."""
    model = store.model_info()
    damage: str | None = getattr(store, "damage", None)
    return {
        "store": store.location,
        "model": model[0] if model else None,
        "dim": model[1] if model else None,
        "images": store.count() if model else 0,
        "failed": store.failure_count(),
        "failures": [{"path": f.path, "reason": f.reason, "at": f.at} for f in store.failures(failures)],
        **({"warning": damage} if damage else {}),
    }


def missing_store_status(directory: Path) -> dict[str, Any]:
    """The status of an embedded store that does not exist yet (nothing is created to report it)."""
    return {"store": str(directory), "model": None, "images": 0, "failed": 0, "failures": []}
