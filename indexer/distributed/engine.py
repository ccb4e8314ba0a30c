"""The Ray engine: ``indexer embed --ray`` and ``indexer index --ray``. The only module that imports ray.

Flow (Ray Data, streaming)::

    parts (planned here) → CPU decode tasks (bytes in, uint8 pixels + metadata out, failures as rows)
        → GPU embedding actors (ActorPoolStrategy, fractional GPUs, weights from a local path on each node)
        → this process: one Parquet file per part (temp then rename: the resume marker) [+ store upserts]

Every stage declares ``num_cpus``/``num_gpus`` (a pool of actors taking the default 1 CPU each deadlocks a small
machine). A killed actor's part is retried by Ray Data; a part whose file already exists is never written or
upserted twice, and point ids are deterministic, so a replay is harmless. Ray's own progress bars and log lines
are turned off; the caller draws one bar. ``ray stop`` is never called: a cluster started here is shut down with
``ray.shutdown()``, one that was running already is left as it was.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.decode.limits import decode_limits
from indexer.distributed.parts import PART_PREFIX, PART_SUFFIX, Part, decode_row, meta_from_dict, plan_parts
from indexer.distributed.stage import PartEmbedder, model_json, vectors_of
from indexer.errors import ConfigError
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.loop import NoProgress, Progress, drain
from indexer.ingest.plan import check_roots
from indexer.ingest.sinks import remove_points
from indexer.library.export import embedding_columns, export_points, write_embedding_part
from indexer.model.lazy import LazyModel
from indexer.records import Failure, RunSummary, SearchFilter, StoredPoint, point_id
from indexer.settings import Settings
from indexer.sources.shards import SHARD_PENDING
from indexer.store.payload import FolderFields, payload_for
from indexer.store.protocol import VectorStore
from indexer.store.server import QdrantServerStore

log = logging.getLogger(__name__)

DEFAULT_HNSW_M = 16  # Qdrant's default, restored after a bulk load into a new collection


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. ``num_gpus_per_worker`` and ``model_inference_batch_size`` as NeMo Curator's stage has
    them; ``workers`` 0: as many embedding actors as the cluster's GPUs hold (one on a cluster without GPUs)."""

    address: str | None = None
    num_gpus_per_worker: float = 0.25
    model_inference_batch_size: int = 0  # 0: the model settings' batch size
    workers: int = 0
    part_size: int = 256
    actor_cpus: float = 0.25
    decode_cpus: float = 1.0
    shard_number: int | None = None  # a new Qdrant server collection's sharding
    replication_factor: int | None = None
    die_marker: str = ""  # test-only: one embedding actor dies mid-batch once (tests/test_distributed.py)


def run_ray_embed(
    paths: Sequence[str | Path], output: Path, settings: Settings, options: RayOptions,
    progress: Progress | None = None,
) -> RunSummary:  # fmt: skip
    """Embed every image under ``paths`` on Ray into ``output``, a directory of ``part-ID.parquet`` files with the
    columns of an ``indexer embed`` file (one machine or many: the same columns; ``indexer import`` reads them).
    Parts already there are skipped; stale ones, and parts in another schema, are removed."""
    return _run(paths, output, settings, options, progress or NoProgress(), store=None)[0]


def run_ray_index(
    paths: Sequence[str | Path], settings: Settings, store: VectorStore, options: RayOptions,
    parts_dir: Path, progress: Progress | None = None,
) -> RunSummary:  # fmt: skip
    """Embed on Ray and upsert into ``store`` from this process (the embedded store takes one writer), keeping
    the parts in ``parts_dir`` in the export format (the whole payload: ``indexer import`` into another store
    loses nothing). A Qdrant server collection is bulk-loaded with HNSW building deferred."""
    model = LazyModel(settings.model)
    with bulk_load(store, model.model_id, model.dim, options):
        summary, parts = _run(paths, parts_dir, settings, options, progress or NoProgress(), store=store)
        if not summary.interrupted:
            _mark_complete_shards(parts, parts_dir, store)
            remove_points(store, _gone(check_roots(paths), parts, store), summary)
    if summary.failures:
        store.record_failures(summary.failures)
    store.optimize()
    store.flush()
    return summary


# --- the run ----------------------------------------------------------------------------------------------------


def _run(
    paths: Sequence[str | Path], out_dir: Path, settings: Settings, options: RayOptions, progress: Progress,
    store: VectorStore | None,
) -> tuple[RunSummary, list[Part]]:  # fmt: skip
    if out_dir.suffix.lower() in (".parquet", ".npy"):
        raise ConfigError("--output", f"{out_dir}: with --ray the output is a directory of part files")
    roots = check_roots(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary()
    parts, scan_failures = plan_parts(roots, options.part_size, follow_symlinks=settings.index.follow_symlinks,
                                      include_hidden=settings.index.include_hidden)  # fmt: skip
    for failure in scan_failures:
        summary.add_failure(failure)
    shard_columns = any(p.kind == "shard" for p in parts)
    _remove_stale(out_dir, parts, None if store is not None else embedding_columns(shard_columns))
    todo = [p for p in parts if not (out_dir / p.file_name()).exists()]
    summary.unchanged = sum(p.images for p in parts) - sum(p.images for p in todo)
    log.info("%d parts: %d to embed, %d already done", len(parts), len(todo), len(parts) - len(todo))
    if not todo:
        return summary, parts
    progress.start(sum(p.images for p in todo), "embedding on ray")
    try:
        with ray_session(options.address):
            rows = _dataset(todo, settings, options).iter_rows()
            drain(_part_batches(rows, out_dir), PartSink(out_dir, store, shard_columns), summary, progress)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        progress.close()
    return summary, parts


def _gone(roots: Sequence[Path], parts: list[Part], store: VectorStore) -> list[StoredPoint]:
    """Stored points under ``roots`` whose file (or whole shard) is no longer among the run's inputs."""
    files = {path for part in parts if part.kind == "files" for path, _, _ in part.files}
    shards = {part.source for part in parts if part.kind == "shard"}
    gone: list[StoredPoint] = []
    for root in roots:
        prefix = root.parent if root.is_file() else root
        for point in store.scroll(filter=SearchFilter(path_prefix=str(prefix))):
            shard = point.payload.get("shard")
            if root.is_file() and str(shard or point.path) != str(root):
                continue  # beside the file given, not under it
            if (shard not in shards) if shard else (point.path not in files):
                gone.append(point)
    return gone


def _mark_complete_shards(parts: list[Part], parts_dir: Path, store: VectorStore) -> None:
    """A shard read in several parts gets its mtime on its points only once every part is stored (until then a
    plain ``indexer index`` reads it again rather than take a partly stored shard for unchanged)."""
    import pyarrow.parquet as pq

    by_shard: dict[str, list[Part]] = {}
    for part in parts:
        if part.kind == "shard" and not part.whole_shard:
            by_shard.setdefault(part.source, []).append(part)
    for shard_parts in by_shard.values():
        files = [parts_dir / p.file_name() for p in shard_parts]
        if all(f.exists() for f in files):
            ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
            if ids:
                store.set_payload(ids, {"shard_mtime_ns": shard_parts[0].shard_mtime_ns})


def _remove_stale(out_dir: Path, parts: list[Part], columns: tuple[str, ...] | None) -> None:
    """Part files of inputs that changed or left, or (``columns`` given) written with other columns (an earlier
    version's export-format parts, or a run without shards): the directory holds exactly the current parts, in
    one schema."""
    import pyarrow.parquet as pq

    wanted = {p.file_name() for p in parts}
    for path in out_dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
        if path.name not in wanted:
            log.info("removing stale part %s", path)
            path.unlink()
        elif columns is not None and tuple(pq.read_schema(path).names) != columns:
            log.info("removing part %s: written with other columns, embedded again", path)
            path.unlink()


@dataclass(frozen=True, slots=True)
class PartBatch(EmbeddedBatch):
    """The embedded images of one part, as the actors return them."""

    part: Part
    model_id: str


def _part_batches(rows: Iterable[dict[str, Any]], out_dir: Path) -> Iterator[PartBatch | Failure]:
    """Each embedded part once (Ray Data may replay a part: the copy is dropped), its failures first."""
    seen: set[str] = set()
    for row in rows:
        part = Part.from_json(row["part"])
        if part.part_id in seen or (out_dir / part.file_name()).exists():
            log.warning("part %s arrived twice: the copy is dropped", part.part_id)
            continue
        seen.add(part.part_id)
        yield from (Failure(Path(path), reason) for path, reason in json.loads(row["failures"]))
        metas = [meta_from_dict(m) for m in json.loads(row["metas"])]
        yield PartBatch(metas, vectors_of(row), 0.0, part, str(row["model"]))


class PartSink:
    """Writes each embedded part once: upsert first (when there is a store), then the part file (rename: the
    resume marker). Without a store (``indexer embed --ray``) the part has the columns ``indexer embed`` writes;
    with one, the export format (the whole payload)."""

    def __init__(self, out_dir: Path, store: VectorStore | None, shard_columns: bool) -> None:
        self.out_dir, self.store, self.shard_columns = out_dir, store, shard_columns
        self._folders = FolderFields()

    def write(self, batch: PartBatch) -> None:
        target, dim = self.out_dir / batch.part.file_name(), batch.vectors.shape[1]
        if self.store is None:
            write_embedding_part(batch.metas, batch.vectors, target, dim, batch.model_id, self.shard_columns)
            return
        points = _points(batch, self._folders)
        self.store.upsert(points)
        self.store.clear_failures([p.path for p in points])
        export_points(points, target, dim, batch.model_id)

    def fail(self, failure: Failure) -> Failure:
        return failure


def _points(batch: PartBatch, folders: FolderFields) -> list[StoredPoint]:
    now = time.time()
    # A part of a shard is not the whole shard: its points must not make the shard look unchanged.
    part = batch.part
    pending = {"shard_mtime_ns": SHARD_PENDING} if part.kind == "shard" and not part.whole_shard else {}
    return [
        StoredPoint(point_id(meta.path), {**payload_for(meta, batch.model_id, now, folders), **pending}, vector.copy())
        for meta, vector in zip(batch.metas, batch.vectors, strict=True)
    ]


# --- Ray --------------------------------------------------------------------------------------------------------


def require_ray() -> Any:
    """The ray module, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray", "Ray is not installed: pip install 'indexer[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to the cluster at ``address`` (or start a local one with every CPU and GPU of this machine),
    unless this process is connected already; quiet Ray's own output. Never ``ray stop``."""
    ray = require_ray()
    _quiet(ray)
    if ray.is_initialized():
        yield
        return
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def _quiet(ray: Any) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dataset(todo: list[Part], settings: Settings, options: RayOptions) -> Any:
    import ray

    model = LazyModel(settings.model)
    batch = options.model_inference_batch_size or settings.model.batch_size
    model_settings = settings.model.model_copy(update={"batch_size": batch, "allow_download": False})
    gpus, workers = _actor_resources(ray, options, len(todo))
    log.info("ray: %d embedding actors at %.2f GPU, %.2f CPU each", workers, gpus, options.actor_cpus)
    items: Any = ray.data.from_items([{"part": p.to_json()} for p in todo], override_num_blocks=len(todo))
    decoded: Any = items.map(
        decode_row,
        fn_kwargs={"spec": model.preprocess, "limits": decode_limits(settings)},
        num_cpus=options.decode_cpus,
        num_gpus=0,
    )
    return decoded.map(
        PartEmbedder,
        fn_constructor_kwargs={"model": model_json(model_settings), "die_marker": options.die_marker},
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=options.actor_cpus,
        num_gpus=gpus,
    )


def _actor_resources(ray: Any, options: RayOptions, parts: int) -> tuple[float, int]:
    """(GPUs per actor, actors): fractional GPUs where the cluster has GPUs, CPU actors where it has none."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = options.num_gpus_per_worker if cluster_gpus > 0 else 0.0
    if options.workers:
        workers = options.workers
    elif gpus > 0:
        workers = max(1, int(cluster_gpus / gpus + 1e-9))
    else:
        workers = 1
    return gpus, max(1, min(workers, parts))


# --- Qdrant server bulk load --------------------------------------------------------------------------------------


@contextmanager
def bulk_load(store: VectorStore, model_id: str, dim: int, options: RayOptions) -> Iterator[None]:
    """Qdrant's bulk-upload recipe on a server collection: create it with the given sharding, build no HNSW graph
    while loading (``m=0``), restore it at the end. Other stores: just make sure the collection exists."""
    if not isinstance(store, QdrantServerStore):
        store.ensure_collection(model_id, dim)
        yield
        return
    from qdrant_client import models as qm

    client, name = store.client, store.collection
    if client.collection_exists(name):
        store.ensure_collection(model_id, dim)  # same model, or a clear error before anything changes
        restore = client.get_collection(name).config.hnsw_config.m or DEFAULT_HNSW_M
    else:
        client.create_collection(
            name,
            vectors_config=qm.VectorParams(size=dim, distance=qm.Distance.COSINE),
            shard_number=options.shard_number,
            replication_factor=options.replication_factor,
            hnsw_config=qm.HnswConfigDiff(m=0),
        )
        store.ensure_collection(model_id, dim)  # adopts it: records the model, creates the payload indexes
        restore = DEFAULT_HNSW_M
    client.update_collection(name, hnsw_config=qm.HnswConfigDiff(m=0))
    try:
        yield
    finally:
        client.update_collection(name, hnsw_config=qm.HnswConfigDiff(m=restore))
        log.info("bulk load done: HNSW (m=%d) builds now on the server", restore)
