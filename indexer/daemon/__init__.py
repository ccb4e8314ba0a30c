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
