"""The Edge shard's files: how a new one is configured, the space its steps take from the filesystem, errors.

Qdrant Edge memory-maps its files and fills sparse ones when it opens a shard: a page it cannot get from a full
filesystem is a SIGBUS that kills the process, not an error. So every step that maps or writes checks first
(`check_space`), with the figures `store.directory` measures.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import qdrant_edge as edge

from indexer.errors import StoreBusyError, StoreError, StoreFullError
from indexer.store.base import _reason
from indexer.store.directory import read_only_error

MB = 1024 * 1024
# What opening a shard may write beyond filling its mapped files (its config, a replayed write-ahead log).
OPEN_SLACK_MB = 4.0
# Vectors of a new store (a million 768-d vectors, bench/README.md): int8 copies in memory for the search (0.77 GB),
# the float32 originals on disk (3 GB, read through the page cache) to rescore the best candidates. The int8 range
# spans every value (quantile 1.0): clipping the outer 1% cost queries unlike the images recall (0.956 against 0.984
# at 100k, bench/README.md "Search").
QUANTILE = 1.0
# The graph of a new quantized store: CLIP-like data (clustered, a shared direction) need more links than Qdrant's
# defaults (m 16, ef_construct 100) for recall@10 >= 0.98.
HNSW_M = 32
HNSW_EF_CONSTRUCT = 256


def edge_config(dim: int, quantize: bool, indexing_threshold_kb: int | None) -> edge.EdgeConfig:
    """The configuration of a new shard: cosine vectors; quantized (int8 in memory, originals on disk) unless not."""
    optimizers = None
    if indexing_threshold_kb is not None:
        optimizers = edge.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb)
    if not quantize:
        vectors = edge.EdgeVectorParams(size=dim, distance=edge.Distance.Cosine)
        return edge.EdgeConfig(vectors=vectors, optimizers=optimizers)
    int8 = edge.ScalarQuantizationConfig(edge.ScalarType.Int8, quantile=QUANTILE, memory=edge.Memory.Pinned)
    vectors = edge.EdgeVectorParams(
        size=dim, distance=edge.Distance.Cosine, memory=edge.Memory.Cold, quantization_config=int8
    )
    hnsw = edge.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=10_000)
    return edge.EdgeConfig(vectors=vectors, optimizers=optimizers, hnsw_config=hnsw)


def check_space(
    directory: Path, what: str, min_free_mb: float, fills_mb: float = 0.0, *, plus_margin: bool = False
) -> None:
    """Refuse to go on without the space this step takes (StoreFullError naming the free and needed space).

    Writes need min_free_mb free. A step that fills ``fills_mb`` of files needs that much plus a little
    (OPEN_SLACK_MB) and never less than min_free_mb; with ``plus_margin`` (an optimize, which goes on to write)
    it needs the margin on top."""
    margin = min_free_mb
    needed = fills_mb + margin if plus_margin else max(fills_mb + OPEN_SLACK_MB if fills_mb else 0.0, margin)
    free = free_mb(directory)
    if free >= needed or needed <= 0:
        return
    why = [f"{what} fills about {fills_mb:.1f} MB of its files"] if fills_mb >= 0.1 or margin <= 0 else []
    if margin > 0:
        why.append(f"the store keeps at least {margin:g} MB free: store.min_free_mb")
    raise StoreFullError(
        f"the store at {directory} cannot {what}: No space left on device ({free:.1f} MB free, "
        f"{needed:.1f} MB needed: {'; '.join(why)}); free some space or move the store (--store DIR)"
    )


def free_mb(directory: Path) -> float:
    """Free space (MB, for an unprivileged writer) on the filesystem of directory or of its nearest parent."""
    path = directory
    while not path.exists() and path.parent != path:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MB


def edge_error(exc: Exception, directory: Path, what: str) -> StoreError:
    """Translate an Edge exception; the WAL lock held by another process becomes StoreBusyError."""
    text = _reason(exc)
    if "WouldBlock" in text or "Resource temporarily unavailable" in text:
        return StoreBusyError(directory, "its write-ahead log is locked")
    if "os error 30" in text or "Read-only file system" in text:
        return read_only_error(directory, OSError(errno.EROFS, "Read-only file system"))
    return StoreError(f"the store at {directory} failed to {what}: {text}")


def writable(directory: Path) -> bool:
    """False for an existing store directory on a read-only filesystem or without write permission."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return True
    try:
        read_only_fs = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return True
    return not read_only_fs and os.access(directory, os.W_OK)


def copy_tree(source: Path, target: Path) -> None:
    """Copy a store directory keeping holes (Edge's files are mostly sparse); without GNU cp, shutil."""
    cp = shutil.which("cp")
    if cp is not None:
        proc = subprocess.run([cp, "-a", "--sparse=always", str(source), str(target)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lock"))
