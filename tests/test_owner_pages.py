"""Points between the CLI and the store's owner travel as pages (`indexer.daemon.pointpage`: ids and payloads in a
JSON header, the vectors in one float32 block), both ways: over real HTTP to the real app over a real Edge store,
vectors come back bit for bit, points without vectors travel too, and a malformed page is a 422 naming its part,
behind the same guards as every control route."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from indexer.api.routes import create_app
from indexer.daemon.client import OwnerClient
from indexer.daemon.pointpage import MEDIA_TYPE, Page, PageError, decode_page, encode_page
from indexer.daemon.remote import RemoteStore
from indexer.errors import StoreError
from indexer.model.lazy import LazyModel
from indexer.records import StoredPoint, point_id
from indexer.settings import Settings
from indexer.store.edge_store import EdgeStore
from indexer.store.locked import LockedStore
from indexer.store.protocol import WRITE_BATCH
from tests.conftest import shapes_settings
from tests.support.live_server import Owner, serve
from tests.support.rawhttp import raw_request

DIM = 768  # a ViT-L/14 vector
POINTS = 40
PAGE = ("Content-Type", MEDIA_TYPE)
JSON = ("Content-Type", "application/json")


def make_points(count: int, seed: int, first: int = 0) -> list[StoredPoint]:
    """``count`` points with unit 768-d vectors and the payload fields the library reads."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, DIM), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    points = []
    for i, row in enumerate(rows, start=first):
        path = f"/photos/{i % 3}/IMG_{i:05d}.jpg"
        payload = {"path": path, "sha256": f"{i:064x}", "width": 640 + i, "format": "JPEG", "note": "é ✓"}
        points.append(StoredPoint(point_id(Path(path)), payload, row))
    return points


def bits(vector: npt.NDArray[np.float32] | None) -> bytes:
    assert vector is not None
    return np.asarray(vector, dtype="<f4").tobytes()


@dataclass
class Live:
    url: str
    port: int
    store: LockedStore
    settings: Settings
    points: list[StoredPoint]

    def remote(self) -> RemoteStore:
        return RemoteStore(OwnerClient(self.url, self.settings))

    def post(self, path: str, body: bytes, headers: Sequence[tuple[str, str]]) -> tuple[int, Any]:
        status, answer, _ = raw_request("127.0.0.1", self.port, "POST", "/control" + path, body, headers, timeout=10)
        return status, answer


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A real owner app over a real Edge store holding POINTS points of 768-d vectors."""
    settings = shapes_settings(tmp_path_factory.mktemp("pages") / "store")
    model = LazyModel(settings.model)
    store = LockedStore(lambda: EdgeStore(settings.store.dir))
    store.ensure_collection("clip-shaped", DIM)
    points = make_points(POINTS, seed=1)
    store.upsert(points)
    app = create_app(settings, store, model, api_key="", owner=Owner(settings, store, model), page=False)
    with serve(app) as url:
        yield Live(url, int(url.rsplit(":", 1)[1]), store, settings, points)
    store.close()


# --- the codec ------------------------------------------------------------------------------------------------------


def test_a_page_keeps_points_without_a_vector_in_their_place() -> None:
    points = make_points(4, seed=2)
    points[1] = StoredPoint(points[1].id, points[1].payload, None)
    page = decode_page(encode_page(points, cursor="c" * 32))
    assert page.cursor == "c" * 32 and [p.id for p in page.points] == [p.id for p in points]
    assert page.points[1].vector is None and page.points[1].payload == points[1].payload
    assert [bits(page.points[i].vector) for i in (0, 2, 3)] == [bits(points[i].vector) for i in (0, 2, 3)]
    assert decode_page(encode_page([])) == Page([], None)
    empty = decode_page(encode_page(points[1:2]))
    assert empty.points[0].vector is None


def test_the_vectors_of_a_page_are_one_aligned_block_of_little_endian_float32() -> None:
    points = make_points(3, seed=3)
    data = encode_page(points)
    size = struct.unpack_from("<I", data, 4)[0]
    assert data[:4] == b"IXP1" and (8 + size) % 4 == 0
    assert len(data) - 8 - size == 3 * DIM * 4 and json.loads(data[8 : 8 + size])["dim"] == DIM
    assert data[8 + size :] == b"".join(bits(p.vector) for p in points)
    vector = decode_page(data).points[0].vector
    assert vector is not None and vector.dtype == np.float32 and vector.flags.writeable


# --- both ways through the owner ------------------------------------------------------------------------------------


def test_scroll_retrieve_and_find_by_sha256_bring_the_vectors_back_bit_for_bit(live: Live) -> None:
    remote, local = live.remote(), {p.id: p for p in live.store.scroll(with_vectors=True)}
    paged = list(remote.scroll(with_vectors=True, batch_size=7))  # 6 pages through one cursor
    assert sorted(p.id for p in paged) == sorted(local) and len(paged) == POINTS
    assert all(bits(p.vector) == bits(local[p.id].vector) and p.payload == local[p.id].payload for p in paged)
    ids = [p.id for p in live.points[:5]] + [point_id(Path("/nowhere.jpg"))]
    got = remote.retrieve(ids, with_vectors=True)
    assert [p.id for p in got] == ids[:5] and all(bits(p.vector) == bits(local[p.id].vector) for p in got)
    found = remote.find_by_sha256([str(live.points[7].payload["sha256"])], with_vectors=True)
    assert [p.id for p in found] == [live.points[7].id] and bits(found[0].vector) == bits(local[found[0].id].vector)


def test_points_without_vectors_travel_as_pages_too(live: Live) -> None:
    remote = live.remote()
    bare = list(remote.scroll(batch_size=16))
    assert len(bare) == POINTS and all(p.vector is None for p in bare)
    assert {p.id: p.payload for p in bare} == {p.id: p.payload for p in live.store.scroll()}
    got = remote.retrieve([live.points[0].id])
    assert got[0].vector is None and got[0].payload["note"] == "é ✓"


def test_an_upsert_through_the_owner_stores_what_a_direct_upsert_stores(live: Live, tmp_path: Path) -> None:
    points = make_points(WRITE_BATCH + 20, seed=4, first=1000)  # two requests
    live.remote().upsert(points)
    with EdgeStore(tmp_path / "direct") as direct:
        direct.ensure_collection("clip-shaped", DIM)
        direct.upsert(points)
        expected = {p.id: p for p in direct.retrieve([p.id for p in points], with_vectors=True)}
    stored = live.store.retrieve([p.id for p in points], with_vectors=True)
    try:
        assert len(stored) == len(points)
        assert all(
            bits(p.vector) == bits(expected[p.id].vector) and p.payload == expected[p.id].payload for p in stored
        )
    finally:
        live.store.delete([p.id for p in points])


# --- malformed pages, and the guards --------------------------------------------------------------------------------


def _framed(header: Any, block: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return b"IXP1" + struct.pack("<I", len(text)) + text + block


def _header(points: list[dict[str, Any]], dim: int = DIM) -> dict[str, Any]:
    return {"dim": dim, "cursor": None, "points": points}


ONE = {"id": point_id(Path("/x.jpg")), "payload": {"path": "/x.jpg"}, "vector": True}
FLOATS = np.zeros(DIM, "<f4").tobytes()


@pytest.mark.parametrize(
    ("body", "part"),
    [
        (b"", "body"),
        (json.dumps({"points": []}).encode(), "body"),
        (b"IXP1" + struct.pack("<I", 1000) + b"{}", "header"),
        (_framed(None, raw=b"{not json"), "header"),
        (_framed(None, raw=b"\xff\xfe"), "header"),
        (_framed({"dim": DIM, "points": []}), "header"),
        (_framed({**_header([]), "colour": "red"}), "header"),
        (_framed(_header([], dim=-1)), "dim"),
        (_framed(_header([], dim=10**9)), "dim"),
        (_framed(_header([], dim=True)), "dim"),
        (_framed({**_header([]), "cursor": 5}), "cursor"),
        (_framed({**_header([]), "points": {}}), "points"),
        (_framed(_header([{**ONE, "id": "not-a-uuid"}]), FLOATS), "points[0].id"),
        (_framed(_header([{**ONE, "payload": [1]}]), FLOATS), "points[0].payload"),
        (_framed(_header([{**ONE, "vector": "yes"}]), FLOATS), "points[0].vector"),
        (_framed(_header([{**ONE, "extra": 1}]), FLOATS), "points[0]"),
        (_framed(_header([ONE]), FLOATS[:-4]), "vectors"),
        (_framed(_header([ONE]), FLOATS + b"\0\0\0\0"), "vectors"),
        (_framed(_header([ONE], dim=0)), "dim"),
        (_framed(_header([{**ONE, "vector": False}])), "points[0].vector"),  # an upsert needs vectors
        (_framed(_header([ONE], dim=4), b"\0" * 16), "dim"),  # not the store's 768
        (_framed(_header([{**ONE, "vector": False}] * 10_001)), "points"),
    ],
)
def test_a_malformed_page_is_a_422_naming_the_part_that_is_wrong(live: Live, body: bytes, part: str) -> None:
    before = live.store.count()
    status, answer = live.post("/store/upsert", body, [PAGE])
    assert status == 422 and answer["error"] == "ValidationError", answer
    assert answer["errors"][0]["loc"] == ["body", part] and f"body.{part}: " in answer["detail"], answer
    assert live.store.count() == before


def test_the_client_names_what_is_wrong_with_an_answer(live: Live) -> None:
    with pytest.raises(PageError, match=r"^vectors: 4 bytes, but 1 × 768 float32 take 3072$"):
        decode_page(_framed(_header([ONE]), b"\0" * 4))
    owner = OwnerClient(live.url, live.settings)  # an owner answering JSON where a page is due: an older one
    with pytest.raises(StoreError, match="not a page of points: it runs an older version of the indexer"):
        owner.points("/store/count", {"filter": None})


def test_each_control_route_takes_the_body_it_declares_behind_the_same_guards(live: Live) -> None:
    page = encode_page(make_points(1, seed=5, first=2000))
    for content_type in ("application/json", "text/plain", "application/octet-stream", ""):
        status, answer = live.post("/store/upsert", page, [("Content-Type", content_type)] if content_type else [])
        assert status == 415 and answer["error"] == "UnsupportedMediaError" and MEDIA_TYPE in answer["detail"]
    ids = json.dumps({"ids": [point_id(Path("/x.jpg"))], "with_vectors": True}).encode()
    status, answer = live.post("/store/retrieve", ids, [PAGE])
    assert status == 415 and "application/json" in answer["detail"]
    status, answer = live.post("/store/upsert", page, [PAGE, ("Host", "evil.example")])
    assert status == 403 and answer["error"] == "HostNotAllowedError"
    status, answer = live.post("/store/upsert", page, [PAGE, ("Content-Length", str(10**11))])
    assert status == 413 and answer["error"] == "PayloadTooLargeError"
    assert live.post("/store/upsert", page, [PAGE]) == (200, None)
    live.store.delete([point_id(Path("/photos/2/IMG_02000.jpg"))])
