"""The watch daemon (`indexer watch`): keeps the store equal to the watched folders, forever, without losing a file.

Never wipe on an outage: deletions apply only while their root is present and not empty, and a mass deletion is
held until a later scan confirms it (`guard`). While the daemon holds the embedded store, ``indexer search`` and
``indexer status`` ask it over its control endpoint (`control`, found through the advert file by `client`).

    loop       `Daemon`: threads, lifecycle, the worker's loop, roots coming and going; `Resources`
    schedule   `Scheduler`: which scans are due when (typed: `Scan`, `ScanKind`)
    guard      `DeletionGuard`: which deletions apply, which are held; root states
    shared     `LockedStore`, `SharedModel`: the store and the model shared with the control server's threads
    metrics    the Prometheus metrics
    control    `ControlServer`: /healthz, /metrics, /status, /search, with the service's checks and error body
    client     the CLI's side: the advert file, `find_daemon`, `ask_daemon`, `search_via_daemon`, the query codec
"""

from __future__ import annotations

from indexer.daemon.client import (
    ADVERT_FILE,
    advertised,
    ask_daemon,
    find_daemon,
    query_from_json,
    query_to_json,
    search_via_daemon,
    status_via_daemon,
)
from indexer.daemon.control import ControlServer
from indexer.daemon.guard import DeletionGuard, Held, root_identity, root_of, root_state
from indexer.daemon.loop import Daemon, Resources
from indexer.daemon.metrics import Metrics
from indexer.daemon.schedule import Scan, ScanKind, Scheduler
from indexer.daemon.shared import LockedStore, SharedModel

__all__ = [
    "ADVERT_FILE",
    "ControlServer",
    "Daemon",
    "DeletionGuard",
    "Held",
    "LockedStore",
    "Metrics",
    "Resources",
    "Scan",
    "ScanKind",
    "Scheduler",
    "SharedModel",
    "advertised",
    "ask_daemon",
    "find_daemon",
    "query_from_json",
    "query_to_json",
    "root_identity",
    "root_of",
    "root_state",
    "search_via_daemon",
    "status_via_daemon",
]
