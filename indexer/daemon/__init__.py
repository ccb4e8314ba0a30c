"""The watch daemon (`indexer watch`) and the owner of an embedded store: keeps the store equal to the watched
folders, forever, without losing a file, and answers every other command through its one HTTP app.

Never wipe on an outage: deletions apply only while their root is present and not empty, and a mass deletion is
held until a later scan confirms it (`guard`). While a process owns the embedded store (this daemon, or
``indexer serve``), the CLI asks it instead of opening the store (`client`, found through the advert file).

    lifecycle    `Daemon`: start (HTTP app, advert, store, with retries for a brief holder), signals, stop
    worker       `Worker`: the worker thread's loop (reconciliation, event batches, scans); `Resources`
    roots        `Roots`: watched folders coming and going
    schedule     `Scheduler`: which scans are due when (typed: `Scan`, `ScanKind`)
    guard        `DeletionGuard`: which deletions apply, which are held; root states
    sharedmodel  `SharedModel`: the model shared by the owner's threads (the store's is `indexer.store.locked`)
    indexjobs    `IndexJobs`: ``indexer index PATH`` run by the owner
    http         the owner's one app (`indexer.api.routes.create_app` + `indexer.api.control`), served
    metrics      the Prometheus metrics
    client       the CLI's side: the advert file, `owner_of`, `OwnerClient`, the query codec (no torch)
    remote       `RemoteStore`: the store primitives through the owner, for dedup, cluster and export
"""
