"""The Ray engine on a real local Ray cluster (one for the whole test run) with the learned test model.

Folder and shard inputs, four embedding actors at 0.25 GPU each (the declared GPU lets fractional placement run on
the CPU), an actor that dies mid-batch (exactly-once output), resume after losing half the part files, a two-node
``ray.cluster_utils.Cluster`` through the real CLI, the store sinks (embedded, and the Qdrant server path through
qdrant-client's ``:memory:``) and NeMo Curator's stage's counterpart in a ``map_batches`` pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'indexer[ray]')")

from indexer.distributed.engine import RayOptions, run_ray_embed, run_ray_index  # noqa: E402
from indexer.distributed.stage import ImageEmbedder  # noqa: E402
from indexer.ingest.embedfile import run_embed  # noqa: E402
from indexer.ingest.pipeline import run_index  # noqa: E402
from indexer.library.export import export_points, import_file  # noqa: E402
from indexer.model.lazy import LazyModel  # noqa: E402
from indexer.records import point_id  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from indexer.sources.shards import SHARD_PENDING, address  # noqa: E402
from indexer.store.edge_store import EdgeStore  # noqa: E402
from indexer.store.server import QdrantServerStore  # noqa: E402
from tests.conftest import SHAPES_MODEL, shapes_settings  # noqa: E402
from tests.fixtures.shapes import write_dataset  # noqa: E402
from tests.support.clirun import MODEL  # noqa: E402
from tests.support.shardfiles import write_shards  # noqa: E402

pytestmark = pytest.mark.timeout(300)

FOUR_ACTORS = RayOptions(num_gpus_per_worker=0.25, workers=4, part_size=8, actor_cpus=0.05, decode_cpus=0.5)
TWO_ACTORS = replace(FOUR_ACTORS, workers=2)  # fewer actor start-ups where four prove nothing more


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray for the whole run: 2 CPUs, 1 declared GPU (fractional placement without a real one)."""
    context = ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield str(context.address_info["address"])
    ray.shutdown()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return shapes_settings(tmp_path / "store", model={"batch_size": 4})


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_dataset(folder / "a", 14, seed=3, size=64)
    write_dataset(folder / "b", 6, seed=4, size=64)
    return folder


def rows_of(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in sorted(out.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def test_folder_on_four_fractional_gpu_actors(
    ray_cluster: str, tmp_path: Path, images: Path, settings: Settings
) -> None:
    out = tmp_path / "out"
    summary = run_ray_embed([images], out, settings, FOUR_ACTORS)
    assert (summary.indexed, summary.failed) == (20, 0)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.png"))
    assert len(list(out.glob("part-*.parquet"))) == 3  # a/ in 8 + 6, b/ in 6: a part holds one folder's files
    # the vectors are the single-process ones (same model, same pixels)
    model = LazyModel(settings.model).get()
    from indexer.decode.image import decode_file
    from indexer.ingest.pipeline import decode_limits

    first = rows[0]
    decoded = decode_file(Path(first["path"]), model.preprocess, decode_limits(settings))
    expected = model.encode_pixels(decoded.pixels[None])[0]  # type: ignore[union-attr]
    assert float(np.dot(expected, np.asarray(first["embedding"], np.float32))) > 0.9999


def test_shards_with_an_actor_dying_mid_batch_give_every_row_exactly_once(
    ray_cluster: str, tmp_path: Path, settings: Settings
) -> None:
    shards = write_shards(tmp_path / "shards", 2, 10)
    marker = tmp_path / "died"
    out = tmp_path / "out"
    summary = run_ray_embed([tmp_path / "shards"], out, settings, replace(TWO_ACTORS, die_marker=str(marker)))
    assert marker.exists(), "no actor died: the test did not test anything"
    rows = rows_of(out)
    expected = sorted(address(s, f"{n:09d}") for i, s in enumerate(shards) for n in range(i * 10, i * 10 + 10))
    assert sorted(r["path"] for r in rows) == expected  # none lost, none doubled
    assert len({point_id(r["path"]) for r in rows}) == 20 and summary.indexed == 20
    first = next(r for r in rows if r["path"] == expected[0])
    assert first["caption"] == "a red circle" and json.loads(first["json"])["key"] == "000000000"
    assert first["shard"] == str(shards[0]) and first["key"] == "000000000"


def test_a_rerun_embeds_only_the_parts_whose_files_are_missing(
    ray_cluster: str, tmp_path: Path, images: Path, settings: Settings
) -> None:
    out = tmp_path / "out"
    options = replace(TWO_ACTORS, part_size=4)
    run_ray_embed([images], out, settings, options)
    parts = sorted(out.glob("part-*.parquet"))
    before = rows_of(out)
    lost, kept = parts[::2], parts[1::2]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    for p in lost:
        p.unlink()
    summary = run_ray_embed([images], out, settings, options)
    assert summary.indexed == sum(pq.read_metadata(p).num_rows for p in lost)
    assert summary.unchanged == 20 - summary.indexed
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps  # untouched
    after = rows_of(out)
    assert sorted(r["path"] for r in after) == sorted(r["path"] for r in before)


def test_index_on_ray_into_the_embedded_store_keeps_caption_and_metadata(
    ray_cluster: str, tmp_path: Path, settings: Settings
) -> None:
    [shard] = write_shards(tmp_path / "shards", 1, 6)
    with EdgeStore(settings.store.dir) as store:
        summary = run_ray_index([shard], settings, store, replace(TWO_ACTORS, part_size=4), tmp_path / "parts")
        assert summary.indexed == 6 and store.count() == 6
        point = store.retrieve([point_id(address(shard, "000000002"))])[0]
        assert point.payload["caption"] == "a red triangle" and point.payload["metadata"]["key"] == "000000002"
        # both parts stored: the shard is complete, and a plain index run does not read it again
        assert point.payload["shard_mtime_ns"] == shard.stat().st_mtime_ns
        again = run_index([shard], settings, store, LazyModel(settings.model))
        assert (again.indexed, again.unchanged) == (0, 6)
    part_rows = rows_of(tmp_path / "parts")  # the store's parts keep the whole payload (export format)
    first = json.loads(next(r for r in part_rows if r["path"] == address(shard, "000000000"))["metadata"])
    assert first["shard"] == str(shard) and first["shard_size"] == shard.stat().st_size
    assert first["shard_mtime_ns"] == SHARD_PENDING  # a part of a shard (4 of 6) never marks it unchanged
    with EdgeStore(tmp_path / "imported") as other:  # the parts are import files too (indexer import)
        for part in sorted((tmp_path / "parts").glob("part-*.parquet")):
            import_file(other, part)
        assert other.count() == 6
        assert other.retrieve([point_id(address(shard, "000000002"))])[0].payload["caption"] == "a red triangle"


def test_index_on_ray_removes_the_points_of_files_gone_from_disk(
    ray_cluster: str, tmp_path: Path, settings: Settings
) -> None:
    folder = tmp_path / "photos"
    files = write_dataset(folder, 6, seed=5, size=64)
    with EdgeStore(settings.store.dir) as store:
        first = run_ray_index([folder], settings, store, TWO_ACTORS, tmp_path / "parts")
        assert first.indexed == 6 and store.count() == 6
        gone = files[:2]
        for path in gone:
            path.unlink()
        again = run_ray_index([folder], settings, store, TWO_ACTORS, tmp_path / "parts")
        assert again.removed == 2 and store.count() == 4
        assert store.retrieve([point_id(p) for p in gone]) == []


class _SpyClient:
    """qdrant-client's :memory: mode (it ignores sharding and HNSW settings), recording what it was asked."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in ("create_collection", "update_collection"):
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return attr(*args, **kwargs)

        return record


def test_index_on_ray_bulk_loads_a_server_collection_with_hnsw_deferred(
    ray_cluster: str, tmp_path: Path, images: Path, settings: Settings
) -> None:
    store = QdrantServerStore.connect(":memory:", None, "images")
    spy = _SpyClient(store.client)
    store.client = spy  # type: ignore[assignment]
    options = replace(TWO_ACTORS, shard_number=6, replication_factor=2)
    summary = run_ray_index([images / "b"], settings, store, options, tmp_path / "parts")
    assert summary.indexed == 6 and store.count() == 6
    create = next(kw for name, kw in spy.calls if name == "create_collection")
    assert (create["shard_number"], create["replication_factor"], create["hnsw_config"].m) == (6, 2, 0)
    hnsw = [kw["hnsw_config"].m for name, kw in spy.calls if name == "update_collection" and "hnsw_config" in kw]
    assert hnsw[-1] == 16 and 0 in hnsw[:-1]  # deferred while loading, restored at the end
    assert store.model_info() == (LazyModel(settings.model).model_id, 64)


def test_image_embedder_in_a_map_batches_pipeline(ray_cluster: str, settings: Settings) -> None:
    from PIL import Image

    from indexer.decode.geometry import preprocess
    from tests.fixtures.shapes import draw_shape, image_rng

    images = [np.asarray(draw_shape("red", "circle", image_rng(0, i), 80)) for i in range(6)]
    ds = ray.data.from_items([{"image_data": im, "n": i} for i, im in enumerate(images)])
    kwargs: dict[str, Any] = {
        "model_dir": str(SHAPES_MODEL.parent), "model_inference_batch_size": 4, "num_gpus_per_worker": 0.25,
        "remove_image_data": True, "verbose": False, "device": "cpu",
    }  # fmt: skip
    out = ds.map_batches(
        ImageEmbedder, fn_constructor_kwargs=kwargs, batch_size=3, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=2), **ImageEmbedder.ray_remote_args(**kwargs),
    ).take_all()  # fmt: skip
    assert {"image_data"} & set(out[0]) == set()
    model = LazyModel(settings.model).get()
    for row in out:
        pixels = preprocess(Image.fromarray(images[int(row["n"])]), model.preprocess)
        expected = model.encode_pixels(pixels[None])[0]
        assert float(np.dot(expected, row["embedding"])) > 0.9999


def test_cli_embed_on_a_two_node_cluster(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    write_shards(tmp_path / "shards", 2, 5)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        from tests.support.clirun import run

        proc = run("embed", str(tmp_path / "shards"), "--output", str(out), *MODEL, "--ray", "--ray-address",
                   cluster.address, "--part-size", "4", "--json")  # fmt: skip
        assert json.loads(proc.stdout)["indexed"] == 10
        assert len(rows_of(out)) == 10
        assert "Running Dataset" not in proc.stderr and "Started a local Ray" not in proc.stderr
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]


def test_embed_on_ray_writes_the_columns_of_embed_and_import_reads_old_and_new_parts(
    ray_cluster: str, tmp_path: Path, settings: Settings
) -> None:
    folder = tmp_path / "in"
    write_dataset(folder / "photos", 3, seed=6, size=64)
    [shard] = write_shards(folder / "shards", 1, 5)
    single = tmp_path / "single.parquet"
    run_embed([folder], single, settings, LazyModel(settings.model))
    out = tmp_path / "out"
    summary = run_ray_embed([folder], out, settings, replace(TWO_ACTORS, part_size=4))
    assert summary.indexed == 8
    one = pq.read_table(single)
    for part in out.glob("part-*.parquet"):  # one machine or many: the same columns
        assert pq.read_schema(part).names == one.column_names
    assert one.column_names == ["path", "sha256", "width", "height", "embedding", "caption", "json", "key", "shard"]
    by_path = {r["path"]: r for r in one.to_pylist()}
    for row in rows_of(out):
        alone = by_path[row["path"]]
        assert {k: v for k, v in row.items() if k != "embedding"} == {
            k: v for k, v in alone.items() if k != "embedding"
        }
        assert float(np.dot(row["embedding"], alone["embedding"])) > 0.9999
    assert by_path[address(shard, "000000001")]["key"] == "000000001"
    # indexer import reads the new parts (a directory) and the old ones (export format)
    with EdgeStore(tmp_path / "new") as store:
        assert import_file(store, out).imported == 8
        point = store.retrieve([point_id(address(shard, "000000002"))])[0]
        assert (point.payload["shard"], point.payload["key"], point.payload["caption"]) == (
            str(shard), "000000002", "a red triangle")  # fmt: skip
        assert point.payload["metadata"]["key"] == "000000002"
        old = tmp_path / "old"
        old.mkdir()
        export_points(
            list(store.scroll(with_vectors=True)), old / "part-0.parquet", 64, LazyModel(settings.model).model_id
        )
    with EdgeStore(tmp_path / "from-old") as store:
        assert import_file(store, old).imported == 8 and store.count() == 8
    # a part left in the old schema is embedded again, never mixed with new ones
    victim = sorted(out.glob("part-*.parquet"))[0]
    rows = pq.read_metadata(victim).num_rows
    victim.write_bytes((old / "part-0.parquet").read_bytes())
    again = run_ray_embed([folder], out, settings, replace(TWO_ACTORS, part_size=4))
    assert (again.indexed, again.unchanged) == (rows, 8 - rows)
    assert pq.read_schema(victim).names == one.column_names
