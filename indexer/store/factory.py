"""The one way to open a store: from explicit arguments (`open_store`) or from settings
(`open_store_from_settings`). Torch-free: the CLI commands that need no model (dedup, cluster, export, import,
stats) open their store here without importing the model stack."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from indexer.errors import ConfigError
from indexer.store.edge_files import writable
from indexer.store.edge_store import MIN_FREE_MB, EdgeStore, EdgeStoreCopy
from indexer.store.protocol import VectorStore

if TYPE_CHECKING:
    from indexer.settings import Settings


def open_store(
    *,
    store_dir: Path | None,
    qdrant_url: str | None,
    api_key: str | None,
    collection: str,
    min_free_mb: float = MIN_FREE_MB,
    hnsw_ef: int = 0,
    separate_process: bool = False,
) -> VectorStore:
    """The one factory: a Qdrant server when qdrant_url is given, else the embedded store in store_dir
    (which keeps min_free_mb free on its filesystem). ``hnsw_ef``: the searches' graph walk (0: the store's own).
    ``separate_process``: the embedded store is opened in a child process (`indexer.store.child`)."""
    if qdrant_url:
        from indexer.store.server import QdrantServerStore  # qdrant-client only when a server is asked for

        server = QdrantServerStore.connect(qdrant_url, api_key, collection)
        server.hnsw_ef = hnsw_ef
        return server
    if store_dir is None:
        raise ConfigError("store.dir", "give a store directory or a Qdrant URL")
    if separate_process:
        from indexer.store.child import ChildStore

        return ChildStore(store_dir, min_free_mb=min_free_mb, hnsw_ef=hnsw_ef)
    store = EdgeStore(store_dir, min_free_mb=min_free_mb)
    store.hnsw_ef = hnsw_ef
    return store


def open_store_from_settings(
    settings: Settings, *, read_only: bool = False, separate_process: bool = False
) -> VectorStore:
    """The store the settings point at: a Qdrant server when ``store.qdrant_url`` is set, else Qdrant Edge.

    read_only: the command only reads. An embedded store on a read-only filesystem (or without write permission)
    is then read from a temporary copy (Qdrant Edge cannot open a shard it may not write), removed at close; and it
    opens with no free-space margin (store.min_free_mb keeps room for writes): a full disk still lets the library be
    searched, counted and exported, as long as there is room for what the open itself fills.

    separate_process: the embedded store is opened in a process of its own (`indexer index` and the watch daemon,
    as `separate_process_wanted` says)."""
    s = settings.store
    if read_only and not s.qdrant_url and not writable(s.dir):
        copy = EdgeStoreCopy(s.dir)
        copy.hnsw_ef = settings.search.hnsw_ef
        return copy
    return open_store(
        store_dir=s.dir,
        qdrant_url=s.qdrant_url or None,
        api_key=s.api_key or None,
        collection=s.collection,
        min_free_mb=0.0 if read_only else s.min_free_mb,
        hnsw_ef=settings.search.hnsw_ef,
        separate_process=separate_process and not read_only,
    )


def separate_process_wanted(settings: Settings) -> bool:
    """Whether a command that embeds into the store (`indexer index`, `indexer watch`) opens the embedded store in a
    process of its own (``store.separate_process``): on "auto", where the model runs on CUDA. There the main
    process's CPU paces the run, and Qdrant Edge's point conversion and writes hold the GIL for ≈ 0.1 ms an image
    (through the child: ≈ 0.01 ms of pickling); on a CPU the model takes tens of milliseconds an image, and the
    child's start (≈ 0.2 s) would be all that changed."""
    mode = settings.store.separate_process
    if mode == "auto":
        from indexer.model.lazy import cuda_expected  # torch-free

        return cuda_expected(settings.model.device)
    return mode == "on"
