"""`indexer embed`: vectors to a .parquet or .npy file, no store (what NeMo Curator's stage does), through the
ingest loop: the files and then the shard samples under the paths, into one file sink."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from indexer.decode.limits import decode_limits, decode_workers
from indexer.ingest.decoders import decode_pool
from indexer.ingest.loop import Model, NoProgress, Progress, run_loop
from indexer.ingest.plan import check_roots, scan_entries
from indexer.ingest.sinks import FileSink
from indexer.ingest.sources import Chain, FileSource, ShardSource
from indexer.records import RunSummary
from indexer.settings import Settings
from indexer.sources.shards import count_samples, find_shards

__all__ = ["run_embed"]


def run_embed(
    paths: Sequence[str | Path],
    output: Path,
    settings: Settings,
    model: Model,
    progress: Progress | None = None,
) -> RunSummary:
    """Embed every image under ``paths`` into ``output`` (.parquet or .npy); no store involved."""
    from indexer.library.export import open_embedding_writer

    progress = progress or NoProgress()
    roots = check_roots(paths)
    summary = RunSummary()
    entries = list(scan_entries(roots, settings, summary.add_failure))
    shards = find_shards(roots, settings.index.include_hidden)
    progress.start(len(entries) + sum(count_samples(s.path) for s in shards), "embedding")
    pool = decode_pool(settings, model.preprocess, len(entries), model.batch_size)
    shard_source = ShardSource(shards, model.preprocess, decode_limits(settings), decode_workers(settings))
    output_file = open_embedding_writer(output, model.dim, model.model_id, shard_columns=bool(shards))
    with output_file as writer, pool:
        try:
            run_loop(Chain([FileSource(entries, pool), shard_source]), model, FileSink(writer), summary, progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            progress.close()
    return summary
