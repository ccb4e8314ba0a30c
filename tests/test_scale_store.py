"""The store at scale, on small data: a new embedded store keeps int8 copies in memory and the originals on disk
and rescoring gives the exact answer; `indexer import` loads batch by batch with a progress bar."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.vectors import ClipLike, clip_like
from indexer.library.export import export_points, import_file
from indexer.records import StoredPoint, point_id
from indexer.store.edge_store import EdgeStore

Matrix = npt.NDArray[np.float32]


def points(vectors: Matrix) -> list[StoredPoint]:
    return [
        StoredPoint(point_id(f"/p/{i:05d}.jpg"), {"path": f"/p/{i:05d}.jpg", "sha256": f"{i:064x}"}, v)
        for i, v in enumerate(vectors)
    ]


def filled(directory: Path, vectors: Matrix, quantize: bool) -> EdgeStore:
    store = EdgeStore(directory, indexing_threshold_kb=64, quantize=quantize)
    store.ensure_collection("m", vectors.shape[1])
    store.upsert(points(vectors))
    store.optimize()
    return store


def test_quantized_store_round_trips_and_rescored_search_equals_exact(tmp_path: Path) -> None:
    vectors, _ = clip_like(2_000, seed=4)
    queries = ClipLike(2_000, seed=4).chunk(2_000, 2_030)[0]  # held out: more rows of the same library
    with filled(tmp_path / "q", vectors, quantize=True) as store:
        assert store.indexed_vectors_count() == len(vectors)
    config = json.loads((tmp_path / "q/shard/edge_config.json").read_text())
    params = config["vectors"][""]
    assert params["memory"] == "cold" and params["quantization_config"]["scalar"]["type"] == "int8"
    assert list((tmp_path / "q/shard").rglob("quantized.data"))
    exact = queries @ vectors.T
    with EdgeStore(tmp_path / "q") as store:  # reopened: the config is the shard's own
        for q, scores in zip(queries, exact, strict=True):
            hits = store.query(q, limit=10)
            best = np.sort(scores)[::-1][:10]
            assert np.allclose([h.score for h in hits], best, atol=1e-5)  # the originals' scores, the exact order
            assert {int(h.payload["path"][3:8]) for h in hits} <= set(np.flatnonzero(scores >= best[-1] - 1e-6))


def test_payload_indexes_are_on_disk_without_graph_links_and_filtered_search_is_exact(tmp_path: Path) -> None:
    """The payload indexes of a new store carry no graph links of their own (they tripled the graph's build) and
    live on disk; a filtered search on the quantized graph still returns the exact best of the points it keeps."""
    from indexer.records import SearchFilter

    vectors, _ = clip_like(2_000, seed=5)
    store = EdgeStore(tmp_path / "f", indexing_threshold_kb=64)
    store.ensure_collection("m", vectors.shape[1])
    store.upsert([
        StoredPoint(point_id(path := f"/p/{i % 4}/{i:05d}.jpg"), {"path": path, "dirs": ["/p", f"/p/{i % 4}"]}, v)
        for i, v in enumerate(vectors)
    ])  # fmt: skip
    store.optimize()
    with store:
        assert store.indexed_vectors_count() == len(vectors)
        kept = np.arange(len(vectors)) % 4 == 1
        for q in ClipLike(2_000, seed=5).chunk(2_000, 2_010)[0]:
            hits = store.query(q, limit=10, filter=SearchFilter(path_prefix="/p/1"))
            scores = np.where(kept, vectors @ q, -np.inf)
            assert np.allclose([h.score for h in hits], np.sort(scores)[::-1][:10], atol=1e-5)
    configs = [json.loads(f.read_text()) for f in (tmp_path / "f/shard").rglob("payload_index/config.json")]
    fields = [field for config in configs for field in config["indexed_fields"].values()]
    assert configs and fields and all(f["enable_hnsw"] is False and f["memory"] == "cold" for f in fields)


def test_plain_store_is_still_available(tmp_path: Path) -> None:
    vectors, _ = clip_like(500, seed=4)
    with filled(tmp_path / "plain", vectors, quantize=False) as store:
        assert store.query(vectors[3], limit=1)[0].payload["path"] == "/p/00003.jpg"
    config = json.loads((tmp_path / "plain/shard/edge_config.json").read_text())
    assert config["vectors"][""].get("quantization_config") is None


def export_file(tmp_path: Path, n: int) -> Path:
    vectors, _ = clip_like(n, seed=6)
    path = tmp_path / "export.parquet"
    export_points(points(vectors), path, vectors.shape[1], "m")
    return path


def test_import_reports_progress_batch_by_batch_and_optimizes_once(tmp_path: Path) -> None:
    source = export_file(tmp_path, 2_500)
    seen: list[tuple[int, int]] = []
    with EdgeStore(tmp_path / "store", indexing_threshold_kb=64) as store:
        summary = import_file(store, source, batch_size=1_000, on_rows=lambda d, t: seen.append((d, t)))
        assert summary.imported == store.count() == 2_500
        assert store.indexed_vectors_count() == 2_500
    assert seen == [(1_000, 2_500), (2_000, 2_500), (2_500, 2_500)]


def test_import_command_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    source = export_file(tmp_path, 1_200)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    env = os.environ | {"INDEXER_STORE__DIR": str(tmp_path / "store"), "COLUMNS": "100"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer.cli.main", "import", str(source)],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        text=True,
    )
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    assert "imported 1200 images" in out
    assert b"importing" in drawn and b"1200/1200" in drawn


def test_a_batch_goes_into_edge_in_calls_of_update_points(tmp_path: Path) -> None:
    """Edge's update holds the GIL throughout: a batch is written in calls of UPDATE_POINTS (bench/writer_stall.py),
    and every point of it is stored."""
    from indexer.store import edge_store

    vectors, _ = clip_like(300, dim=16, seed=5)
    store = EdgeStore(tmp_path / "store")
    try:
        store.ensure_collection("m", 16)
        shard, calls = store._shard, []

        class Counting:
            def __getattr__(self, name: str) -> object:
                return getattr(shard, name)

            def update(self, operation: object) -> object:
                calls.append(operation)
                return shard.update(operation)  # type: ignore[union-attr, arg-type]

        store._shard = Counting()  # type: ignore[assignment]
        store.upsert(points(vectors))  # 300 points: WRITE_BATCH 256 + 44, each split into calls of 64
        store._shard = shard
        assert len(calls) == 4 + 1 and edge_store.UPDATE_POINTS == 64
        assert store.count() == 300
    finally:
        store.close()
