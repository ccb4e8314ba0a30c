"""Export and import: a store to Parquet and back, between the two backends (Qdrant Edge and the Qdrant server's
in-process double) with identical vectors; through the real CLI into another store (a later index is a no-op);
`indexer embed` files imported the same way; refusals of the wrong model and of malformed files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.ingest.pipeline import run_embed, run_index
from indexer.library.cluster import cluster_store
from indexer.library.export import export_store, import_file
from indexer.model.lazy import LazyModel
from indexer.records import RunSummary, StoredPoint, point_id
from indexer.settings import ClusterSettings
from indexer.store.edge_store import EdgeStore
from indexer.store.protocol import VectorStore
from indexer.store.server import QdrantServerStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import MODEL, run, run_json


def index(folder: Path, store_dir: Path, model: LazyModel) -> RunSummary:
    """`indexer index` in-process (the CLI lane is tests/test_cli.py); the store is closed afterwards."""
    with EdgeStore(store_dir) as store:
        return run_index([folder], shapes_settings(store_dir), store, model)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, model: LazyModel) -> tuple[Path, Path]:
    """12 shapes indexed and clustered (so the payload has a "cluster") into an embedded store."""
    root = tmp_path_factory.mktemp("export")
    write_dataset(root / "shapes", 12, seed=2)
    assert index(root / "shapes", root / "store", model).indexed == 12
    with EdgeStore(root / "store") as store:
        cluster_store(store, ClusterSettings(), k=3)
    return root / "shapes", root / "store"


def points_of(store: VectorStore) -> dict[str, StoredPoint]:
    return {p.id: p for p in store.scroll(with_vectors=True)}


def vector(point: StoredPoint) -> npt.NDArray[np.float32]:
    assert point.vector is not None
    return point.vector


@pytest.fixture
def server() -> Iterator[QdrantServerStore]:
    store = QdrantServerStore.connect(":memory:", None, "images")
    yield store
    store.close()


def test_round_trip_between_backends_keeps_ids_payloads_and_vectors(
    indexed: tuple[Path, Path], server: QdrantServerStore, tmp_path: Path
) -> None:
    """Edge -> file -> server double -> file -> Edge. Qdrant Edge stores a unit vector bit for bit; the server's
    in-process double (qdrant-client local mode) re-normalises cosine vectors in numpy on every upsert, which can
    move the last bit (<= 1 ulp, ~1e-8): vectors are compared exactly where Edge holds them, to 1 ulp there."""
    _, store_dir = indexed
    with EdgeStore(store_dir) as edge:
        original = points_of(edge)
        model = edge.model_info()
        assert export_store(edge, tmp_path / "edge.parquet") == 12
    assert import_file(server, tmp_path / "edge.parquet").imported == 12
    assert server.model_info() == model
    assert export_store(server, tmp_path / "server.parquet") == 12
    via_server = points_of(server)
    with EdgeStore(tmp_path / "back") as back:
        import_file(back, tmp_path / "server.parquet")
        assert back.model_info() == model
        back_again = points_of(back)
    with EdgeStore(tmp_path / "direct") as direct:
        import_file(direct, tmp_path / "edge.parquet")
        edge_to_edge = points_of(direct)
    for copy in (via_server, back_again, edge_to_edge):
        assert copy.keys() == original.keys()
        for pid, point in original.items():
            assert copy[pid].payload == point.payload
            assert np.allclose(vector(copy[pid]), vector(point), rtol=0, atol=3e-8), pid
    for pid, point in original.items():
        assert np.array_equal(vector(edge_to_edge[pid]), vector(point)), pid  # bit for bit
        assert np.array_equal(vector(back_again[pid]), vector(via_server[pid])), pid
    first, second = pq.read_table(tmp_path / "edge.parquet"), pq.read_table(tmp_path / "server.parquet")
    assert first.column_names == ["id", "path", "sha256", "metadata", "vector"]
    first, second = first.sort_by("id"), second.sort_by("id")
    assert first.drop_columns(["vector"]).equals(second.drop_columns(["vector"]))
    meta = json.loads(first.column("metadata")[0].as_py())
    assert {"size", "mtime_ns", "width", "format", "model", "cluster"} <= meta.keys() and "path" not in meta


def test_cli_export_then_import_into_another_store(
    indexed: tuple[Path, Path], tmp_path: Path, model: LazyModel
) -> None:
    folder, store = indexed
    out = tmp_path / "all.parquet"
    assert run_json("export", "--output", str(out), "--store", str(store)) == {"exported": 12, "output": str(out)}
    assert "imported 12 images" in run("import", str(out), "--store", str(tmp_path / "copy")).stdout
    with EdgeStore(store) as source, EdgeStore(tmp_path / "copy") as copy:
        original = points_of(source)
        assert copy.model_info() == source.model_info()
        probe = next(iter(original.values()))
        hits = copy.query(vector(probe), limit=1)
        assert hits[0].id == probe.id and hits[0].score > 0.9999 and hits[0].payload == probe.payload
    again = index(folder, tmp_path / "copy", model)
    assert (again.unchanged, again.indexed) == (12, 0)  # the payload came along: nothing to re-embed
    sub = folder / "sub"
    sub.mkdir(exist_ok=True)
    part = run_json("export", "-o", str(tmp_path / "part.parquet"), "--folder", str(sub), "--store", str(store))
    assert part["exported"] == 0


def test_embed_output_imports_and_only_changed_files_are_embedded_again(tmp_path: Path, model: LazyModel) -> None:
    folder = tmp_path / "shapes"
    files = write_dataset(folder, 6, seed=5)
    out = tmp_path / "vecs.parquet"
    assert run_embed([folder], out, shapes_settings(tmp_path / "unused"), model).indexed == 6
    files[0].write_bytes(files[1].read_bytes())  # changed after it was embedded
    summary = run_json("import", str(out), "--store", str(tmp_path / "store"))
    assert summary["imported"] == 6 and summary["unverified"] == [str(files[0])]
    with EdgeStore(tmp_path / "store") as store:
        assert store.count() == 6 and store.model_info() == (model.model_id, model.dim)
    again = index(folder, tmp_path / "store", model)
    assert (again.unchanged, again.indexed) == (5, 1)


def test_a_jpe_file_embedded_then_imported_is_found_by_format_jpeg(tmp_path: Path) -> None:
    """`.jpe` is a JPEG extension: `indexer import` of an `indexer embed` file stores it as JPEG, as `indexer
    index` does, so `--format JPEG` finds it (it was stored as "JPE" while the formats had four tables)."""
    folder = tmp_path / "photos"
    png = write_dataset(folder, 3, seed=9)
    jpe = folder / "red-circle-camera.jpe"
    Image.open(png[0]).convert("RGB").save(jpe, format="JPEG")
    out = tmp_path / "vecs.parquet"
    run("embed", str(folder), "--output", str(out), *MODEL)
    run("import", str(out), "--store", str(tmp_path / "store"))
    hits = run_json("search", "a red circle", "--format", "JPEG", "--store", str(tmp_path / "store"), *MODEL)
    assert [h["path"] for h in hits] == [str(jpe)]
    with EdgeStore(tmp_path / "store") as store:
        (point,) = store.retrieve([point_id(str(jpe))])
        assert point.payload["format"] == "JPEG"


def test_import_refuses_a_store_of_another_model(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = indexed
    out = tmp_path / "all.parquet"
    with EdgeStore(store) as edge:
        export_store(edge, out)
    with EdgeStore(tmp_path / "other") as other:
        other.ensure_collection("another-model", 64)
    proc = run("import", str(out), "--store", str(tmp_path / "other"), check=2)
    assert "built with model 'another-model'" in proc.stderr


def _vectors_table(rows: list[list[float]], metadata: dict[bytes, bytes] | None) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "path": [f"/x/{i}.png" for i in range(n)],
            "sha256": ["0" * 64] * n,
            "width": [1] * n,
            "height": [1] * n,
            "embedding": pa.array(rows, pa.list_(pa.float32())),
        }
    ).replace_schema_metadata(metadata)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not parquet at all", "is not a Parquet file"),
        (None, "does not record the model"),
        ({b"model": b"m", b"dim": b"3"}, "row 1 has 2 values, not 3"),
        ("missing", "does not exist"),
    ],
)
def test_import_rejects_malformed_files(tmp_path: Path, content: Any, message: str) -> None:
    bad = tmp_path / "bad.parquet"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content != "missing":
        pq.write_table(_vectors_table([[1.0, 0.0, 0.0], [1.0, 0.0]], content), bad)
    proc = run("import", str(bad), "--store", str(tmp_path / "s"), check=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "s" / "shard") or message.startswith("row")


def test_export_needs_a_parquet_name_and_a_store(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = indexed
    assert (
        "use a .parquet file name"
        in run("export", "-o", str(tmp_path / "x.csv"), "--store", str(store), check=2).stderr
    )
    assert (
        "is empty" in run("export", "-o", str(tmp_path / "x.parquet"), "--store", str(tmp_path / "e"), check=2).stderr
    )
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.parquet.partial").exists()


def test_an_embed_file_of_shards_imports_with_its_shard_fields_and_a_folder_of_files_at_once(
    tmp_path: Path, model: LazyModel
) -> None:
    from tests.support.shardfiles import write_shards

    [shard] = write_shards(tmp_path / "shards", 1, 3)
    write_dataset(tmp_path / "shards" / "photos", 2, seed=8, size=64)
    files = tmp_path / "files"
    files.mkdir()
    settings = shapes_settings(tmp_path / "unused")
    run_embed([tmp_path / "shards"], files / "a.parquet", settings, model)
    run_embed([tmp_path / "shards" / "photos"], files / "b.parquet", settings, model)  # no shard columns
    with EdgeStore(tmp_path / "store") as store:
        summary = import_file(store, files)
        assert summary.imported == 5 + 2 and store.count() == 5
        point = store.retrieve([point_id(f"{shard}#000000001")])[0]
        assert (point.payload["shard"], point.payload["key"], point.payload["caption"]) == (
            str(shard), "000000001", "a red square")  # fmt: skip
        assert point.payload["metadata"]["key"] == "000000001"
        assert f"{shard}#000000001" in summary.unverified  # no shard size and mtime: the next index reads it again
        photo = next(p for p in store.scroll() if "shard" not in p.payload)
        assert not {"key", "caption", "metadata"} & set(photo.payload)
