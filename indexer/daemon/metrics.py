"""The watch daemon's Prometheus metrics."""

from __future__ import annotations


class Metrics:
    """The daemon's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.seen = Counter("indexer_watch_files_seen", "Files seen, by events or scans", ["source"], registry=r)
        self.indexed = Counter("indexer_watch_files_indexed", "Files embedded and stored", registry=r)
        self.failed = Counter("indexer_watch_files_failed", "Files skipped because they cannot be read", registry=r)
        self.moved = Counter("indexer_watch_files_moved", "Files moved, vectors kept", registry=r)
        self.removed = Counter("indexer_watch_files_removed", "Points removed, their files gone", registry=r)
        self.rescans = Counter("indexer_watch_rescans", "Scans of the roots", ["reason"], registry=r)
        self.queue = Gauge("indexer_watch_queue_depth", "Files waiting (not complete yet, or for a batch)", registry=r)
        self.held = Gauge("indexer_watch_deletions_held", "Deletions held (mass deletion, root missing)", registry=r)
        self.batch = Histogram(
            "indexer_watch_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )  # fmt: skip
        self.embed = Histogram("indexer_watch_embed_seconds", "Model time per batch", registry=r)
        self.latency = Histogram(
            "indexer_watch_complete_to_searchable_seconds",
            "From a file being complete (closed, renamed in, stable) to it being searchable",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300),
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
