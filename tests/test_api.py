"""The search service over real HTTP: uvicorn in a thread, httpx, a real embedded store, the learned test model.

Plus `indexer serve` and the extended `indexer search` through the real console script.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from indexer.api.guards import check_bind, resolve_api_key
from indexer.api.httpcheck import is_loopback
from indexer.api.routes import create_app
from indexer.errors import ConfigError
from indexer.records import StoredPoint, point_id
from indexer.settings import ServeSettings
from indexer.store.edge_store import EdgeStore
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import INDEXER, MODEL, run
from tests.support.live_server import OLD_MTIME, Corpus, class_of, make_corpus, serve

UPLOAD_MB = 1.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    c = make_corpus(tmp_path_factory.mktemp("api"), thumbnail_size=64, max_upload_mb=UPLOAD_MB)
    yield c
    c.store.close()


@pytest.fixture(scope="module")
def client(corpus: Corpus) -> Iterator[httpx.Client]:
    app = create_app(corpus.settings, corpus.store, corpus.model)
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def hits_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()["hits"]
    return hits


def id_of(corpus: Corpus, name: str) -> str:
    path = next(p for p in corpus.files() if p.name == name)
    return point_id(path)


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# --- search -------------------------------------------------------------------------------------------------


def test_text_search_ranks_red_circles_first(client: httpx.Client, corpus: Corpus) -> None:
    hits = hits_of(client.get("/search", params={"q": "a red circle", "limit": 4}))
    assert [class_of(h["path"]) for h in hits] == ["red-circle"] * 4
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    first = hits[0]
    assert set(first) >= {"id", "path", "score", "width", "height", "mtime", "thumbnail", "image"}
    assert first["id"] == point_id(first["path"]) and Path(first["path"]).is_file()
    assert first["thumbnail"] == f"/images/{first['id']}/thumbnail" and first["image"] == f"/images/{first['id']}"
    assert first["format"] in ("PNG", "JPEG") and first["width"] >= 128 and first["mtime"] >= OLD_MTIME


def test_paging_and_threshold(client: httpx.Client) -> None:
    top = hits_of(client.get("/search", params={"q": "a red circle", "limit": 6}))
    page2 = hits_of(client.get("/search", params={"q": "a red circle", "limit": 3, "offset": 3}))
    assert [h["id"] for h in page2] == [h["id"] for h in top[3:6]]
    cut = (top[1]["score"] + top[2]["score"]) / 2
    kept = hits_of(client.get("/search", params={"q": "a red circle", "threshold": cut}))
    assert [h["id"] for h in kept] == [h["id"] for h in top[:2]]


def test_negative_text_moves_away(client: httpx.Client) -> None:
    hits = hits_of(client.get("/search", params={"q": "a red circle", "not": "red", "limit": 4}))
    assert all(class_of(h["path"]).endswith("-circle") and not class_of(h["path"]).startswith("red") for h in hits)


def test_post_search_combines_ids_and_negative_text(client: httpx.Client, corpus: Corpus) -> None:
    body = {"positive": {"ids": [id_of(corpus, "red-circle-0001.png")]}, "negative": {"texts": ["a circle"]}}
    hits = hits_of(client.post("/search", json={**body, "limit": 4}))
    assert all(class_of(h["path"]) in ("red-square", "red-triangle") for h in hits)


def test_post_search_with_uploaded_image_and_negative_image(client: httpx.Client, tmp_path: Path) -> None:
    probes = write_dataset(tmp_path, 12, seed=99)  # never indexed
    triangle = next(p for p in probes if p.name.startswith("yellow-triangle"))
    data_url = "data:image/png;base64," + base64.b64encode(triangle.read_bytes()).decode()
    hits = hits_of(client.post("/search", json={"positive": {"images": [data_url]}, "limit": 4}))
    assert [class_of(h["path"]) for h in hits] == ["yellow-triangle"] * 4
    yellow_square = next(p for p in probes if p.name.startswith("yellow-square"))
    body = {
        "positive": {"images": [base64.b64encode(triangle.read_bytes()).decode()]},
        "negative": {"images": [base64.b64encode(yellow_square.read_bytes()).decode()]},
        "limit": 6,
    }
    assert all(class_of(h["path"]).endswith("-triangle") for h in hits_of(client.post("/search", json=body)))


def test_search_image_by_upload_and_by_id(client: httpx.Client, corpus: Corpus) -> None:
    probe = next(p for p in corpus.files() if p.name.startswith("green-square"))
    upload = client.post("/search/image", files={"file": ("probe.png", png_bytes(probe), "image/png")})
    hits = hits_of(upload)
    assert hits[0]["path"] == str(probe) and hits[0]["score"] > 0.99
    assert all(class_of(h["path"]) == "green-square" for h in hits[:4])
    by_id = hits_of(client.post("/search/image", params={"limit": 4}, data={"id": point_id(probe)}))
    assert by_id[0]["id"] == point_id(probe) and len(by_id) == 4
    assert all(class_of(h["path"]) == "green-square" for h in by_id)


def test_filters_folder_format_size_and_mtime(client: httpx.Client, corpus: Corpus) -> None:
    def classes_and_paths(flt: dict[str, Any], limit: int = 100) -> list[str]:
        body = {"positive": {"texts": ["a red circle"]}, "filter": flt, "limit": limit}
        return [h["path"] for h in hits_of(client.post("/search", json=body))]

    archive = [str(p) for p in corpus.archive.glob("*.jpg")]
    assert sorted(classes_and_paths({"folder": str(corpus.archive)})) == sorted(archive)
    assert sorted(classes_and_paths({"folder": "archive/"})) == sorted(archive)  # relative to the one root
    assert sorted(classes_and_paths({"formats": ["jpeg"]})) == sorted(archive)
    assert sorted(classes_and_paths({"min_width": 200, "min_height": 200})) == sorted(archive)
    assert sorted(classes_and_paths({"mtime_to": "2021-01-01T00:00:00Z"})) == sorted(archive)
    assert len(classes_and_paths({"mtime_from": 1_600_000_000})) == 48
    assert classes_and_paths({"formats": ["GIF"]}) == []
    get = client.get("/search", params={"q": "a red circle", "format": "JPEG", "min_width": 256, "limit": 50})
    assert sorted(h["path"] for h in hits_of(get)) == sorted(archive)


# --- files ----------------------------------------------------------------------------------------------------


def test_image_endpoint_sends_the_indexed_file(client: httpx.Client, corpus: Corpus) -> None:
    path = corpus.files()[0]
    response = client.get(f"/images/{point_id(path)}")
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert response.headers["content-type"] in ("image/png", "image/jpeg")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_thumbnail_is_made_once_and_cached_on_disk(client: httpx.Client, corpus: Corpus) -> None:
    path = next(p for p in corpus.files() if p.suffix == ".png")
    stored = corpus.store.retrieve([point_id(path)])[0]
    cached = Path(corpus.settings.serve.thumbnail_dir) / stored.payload["sha256"][:2]
    cached = cached / f"{stored.payload['sha256']}-64.jpg"
    assert not cached.exists()
    first = client.get(f"/images/{point_id(path)}/thumbnail")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 64  # 128 px source, thumbnail_size 64
    assert cached.read_bytes() == first.content
    before = cached.stat().st_mtime_ns
    assert client.get(f"/images/{point_id(path)}/thumbnail").content == first.content
    assert cached.stat().st_mtime_ns == before
    assert 'indexer_thumbnails_total{result="hit"} 1.0' in client.get("/metrics").text


def test_a_file_changed_since_indexing_gets_the_thumbnail_of_its_content(client: httpx.Client, corpus: Corpus) -> None:
    path = corpus.shapes / "zz-changed.png"
    Image.new("RGB", (100, 50), "blue").save(path)
    stale = "f" * 64  # the hash the index recorded before the file changed
    vector = np.ones(corpus.model.dim, np.float32) / np.sqrt(corpus.model.dim)
    corpus.store.upsert([StoredPoint(point_id(path), {"path": str(path), "sha256": stale}, vector)])
    try:
        response = client.get(f"/images/{point_id(path)}/thumbnail")
        assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (64, 32)
        thumbs = Path(corpus.settings.serve.thumbnail_dir)
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert (thumbs / actual[:2] / f"{actual}-64.jpg").is_file()
        assert not (thumbs / stale[:2]).exists()
    finally:
        corpus.store.delete([point_id(path)])
        path.unlink()


@pytest.fixture
def planted(corpus: Corpus, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Points whose recorded files try to escape the served root; removed afterwards."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "white").save(secret)
    link = corpus.shapes / "zz-link.png"
    link.symlink_to(secret)
    vector = np.ones(corpus.model.dim, np.float32) / np.sqrt(corpus.model.dim)
    paths = {"symlink": str(link), "dotdot": f"{corpus.shapes}/../../{tmp_path.name}/secret.png", "relative": "a.png"}
    points = [StoredPoint(point_id(p), {"path": p, "sha256": "0" * 64}, vector) for p in paths.values()]
    corpus.store.upsert(points)
    yield {kind: point_id(p) for kind, p in paths.items()}
    corpus.store.delete([p.id for p in points])
    link.unlink()


def test_files_outside_the_root_are_never_sent(client: httpx.Client, planted: dict[str, str]) -> None:
    for kind, image_id in planted.items():
        for url in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
            response = client.get(url)
            assert response.status_code == 404, (kind, response.text)
            assert "cannot be served" in response.json()["detail"]
    assert "outside the served folders" in client.get(f"/images/{planted['symlink']}").json()["detail"]


def test_symlink_escape_refused_without_roots_too(corpus: Corpus, planted: dict[str, str]) -> None:
    settings = corpus.settings.model_copy(deep=True)
    settings.serve.roots = []
    with serve(create_app(settings, corpus.store, corpus.model)) as url:
        assert httpx.get(f"{url}/images/{planted['symlink']}").status_code == 404
        ok = httpx.get(f"{url}/images/{point_id(next(iter(corpus.shapes.glob('*.png'))))}")
        assert ok.status_code == 200


def test_paths_in_urls_are_not_files(client: httpx.Client) -> None:
    for raw in ("/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/images/etc/passwd"):
        response = client.send(client.build_request("GET", httpx.URL(raw)))
        assert response.status_code in (404, 422) and b"root:" not in response.content, raw
    assert client.get("/static/..%2F__init__.py").status_code == 404
    assert client.get("/images/00000000-0000-4000-8000-000000000000").status_code == 404


# --- bad input: always a clear 4xx ----------------------------------------------------------------------------


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("upload", "words"),
    [
        (b"this is not an image", "not an image"),
        (b"", "empty"),
        (bomb_png(), "too large"),
        ("truncated", "truncated"),
    ],
)
def test_broken_uploads_get_422_with_the_reason(client: httpx.Client, corpus: Corpus, upload: Any, words: str) -> None:
    if upload == "truncated":
        upload = corpus.files()[0].read_bytes()[:600]
    response = client.post("/search/image", files={"file": ("x.png", upload, "image/png")})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "DecodeError" and words in response.json()["detail"].lower()


def test_upload_size_limit_is_413(client: httpx.Client) -> None:
    big = os.urandom(int(UPLOAD_MB * 1024 * 1024) + 1000)
    response = client.post("/search/image", files={"file": ("big.png", big, "image/png")})
    assert response.status_code == 413 and "max_upload_mb" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b"x" * 65536

    streamed = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "words"),
    [
        ("GET", "/search", {"params": {"q": "x", "limit": 0}}, 422, "query.limit"),
        ("GET", "/search", {"params": {"q": "  "}}, 422, "query.q"),
        ("GET", "/search", {}, 422, "query.q"),
        ("GET", "/search", {"params": {"q": "x", "threshold": "nan"}}, 422, "threshold"),
        ("POST", "/search", {"json": {"positive": {"texts": ["x"]}, "filter": {"min_width": -1}}}, 422, "min_width"),
        ("POST", "/search", {"json": {"positive": {"texts": ["x"]}, "filter": {"formats": ["J*G"]}}}, 422, "formats"),
        ("POST", "/search", {"json": {"positive": {"texts": ["x"]}, "bogus": 1}}, 422, "bogus"),
        ("POST", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
        ("POST", "/search", {"json": {"negative": {"texts": ["x"]}}}, 400, "give a text"),
        ("POST", "/search", {"json": {"positive": {"images": ["%%%"]}}}, 400, "base64"),
        ("POST", "/search", {"json": {"positive": {"ids": ["not-a-uuid"]}}}, 422, "ids"),
        (
            "POST",
            "/search",
            {"json": {"positive": {"ids": ["00000000-0000-4000-8000-000000000000"]}}},
            404,
            "no indexed",
        ),
        (
            "POST",
            "/search",
            {"json": {"positive": {"texts": ["x"]}, "filter": {"mtime_from": 2e9, "mtime_to": 1e9}}},
            400,
            "after",
        ),
        ("POST", "/search", {"json": {"positive": {"texts": ["x"]}, "filter": {"folder": "a\u0000b"}}}, 422, "nul"),
        ("POST", "/search/image", {}, 400, "either"),
        ("POST", "/search/image", {"data": {"id": "../../etc/passwd"}}, 422, "id"),
        ("GET", "/images/not-a-uuid", {}, 422, "image_id"),
        ("GET", "/nowhere", {}, 404, "not found"),
        ("DELETE", "/search", {}, 405, "not allowed"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    client: httpx.Client, method: str, url: str, kwargs: dict[str, Any], status: int, words: str
) -> None:
    response = client.request(method, url, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and words in body["detail"].lower() and body["error"]


def test_search_image_with_both_file_and_id_is_400(client: httpx.Client, corpus: Corpus) -> None:
    path = corpus.files()[0]
    files = {"file": ("a.png", path.read_bytes(), "image/png")}
    response = client.post("/search/image", files=files, data={"id": point_id(path)})
    assert response.status_code == 400 and "either" in response.json()["detail"]


# --- security ---------------------------------------------------------------------------------------------------


def test_api_key_is_required_when_configured(corpus: Corpus) -> None:
    with serve(create_app(corpus.settings, corpus.store, corpus.model, api_key="s3cret-key")) as url:
        denied = httpx.get(f"{url}/search", params={"q": "a red circle"})
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
        assert "API key" in denied.json()["detail"]
        for path in ("/metrics", "/openapi.json", f"/images/{point_id(corpus.files()[0])}"):
            assert httpx.get(url + path).status_code == 401, path
        wrong = httpx.get(f"{url}/search", params={"q": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(f"{url}/search", params={"q": "x"}, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        for public in ("/", "/static/app.js", "/static/style.css", "/healthz"):
            assert httpx.get(url + public).status_code == 200, public
        # With a key, any Host is fine (the service may sit behind a proxy or listen on the network).
        proxied = httpx.get(f"{url}/healthz", headers={"Host": "photos.example.org"})
        assert proxied.status_code == 200


def test_without_a_key_only_loopback_hosts_are_answered(client: httpx.Client) -> None:
    rebound = client.get("/search", params={"q": "x"}, headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403 and "not allowed" in rebound.json()["detail"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_binding_rules_and_key_sources(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_bind(host, "")
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="API key"):
            check_bind(host, "")
        check_bind(host, "k")
    key = tmp_path / "key"
    key.write_text("  from-file\n")
    assert resolve_api_key(ServeSettings(api_key="inline", api_key_file=str(key))) == "from-file"
    assert resolve_api_key(ServeSettings(api_key="inline")) == "inline"
    key.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_key(ServeSettings(api_key_file=str(key)))
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_api_key(ServeSettings(api_key_file=str(tmp_path / "missing")))


# --- operations -------------------------------------------------------------------------------------------------


def test_healthz_metrics_and_openapi(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["images"] == 60
    client.get("/search", params={"q": "a blue square"})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'indexer_http_requests_total{method="GET",route="/search",status="200"}' in text
    assert 'indexer_search_stage_seconds_count{stage="encode"}' in text
    assert "indexer_images 60.0" in text
    schema = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/images/{image_id}", "/images/{image_id}/thumbnail", "/healthz"} <= set(
        schema["paths"]
    )
    assert {"get", "post"} <= set(schema["paths"]["/search"])


def test_engine_thread_runs_torch_with_serve_threads(corpus: Corpus) -> None:
    settings = corpus.settings.model_copy(deep=True)
    settings.serve.threads = 1
    service = create_app(settings, corpus.store, corpus.model).state.service
    try:
        assert service.executor.submit(torch.get_num_threads).result() == 1
        assert service.executor.submit(threading.current_thread).result().name.startswith("indexer-engine")
    finally:
        service.executor.shutdown()


def test_page_is_self_contained(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


# --- the real console script ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 PNG shapes and 6 old JPEGs, indexed in-process and closed again: (photos folder, store)."""
    corpus = make_corpus(tmp_path_factory.mktemp("cli"), shapes=12, archive=6)
    corpus.store.close()
    return corpus.root, Path(corpus.settings.store.dir)


def test_serve_refuses_a_public_address_without_a_key(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run("serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s"), *MODEL, check=2)
    assert "API key" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 20  # refused before loading anything


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_command_end_to_end(cli_store: tuple[Path, Path], tmp_path: Path) -> None:
    photos, store = cli_store
    key = tmp_path / "api-key"
    key.write_text("cli-secret\n")
    port = free_port()
    args = ["serve", "--port", str(port), "--api-key-file", str(key), "--root", str(photos), "--store", str(store)]
    proc = subprocess.Popen([INDEXER, *args, *MODEL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer cli-secret"}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "indexer serve did not come up"
            time.sleep(0.2)
        assert httpx.get(f"{url}/search", params={"q": "a red circle"}).status_code == 401
        found = httpx.get(f"{url}/search", params={"q": "a red circle", "limit": 1}, headers=auth)
        hit = found.json()["hits"][0]
        assert class_of(hit["path"]) == "red-circle"
        assert httpx.get(url + hit["thumbnail"], headers=auth).headers["content-type"] == "image/jpeg"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (store.parent / "thumbnails").is_dir()  # default thumbnail cache: beside the embedded store
    with EdgeStore(store) as reopened:  # the server released the store
        assert reopened.count() == 18


def test_cli_search_likes_excludes_and_filters_by_time(cli_store: tuple[Path, Path]) -> None:
    photos, store = cli_store
    red_circle = sorted(photos.glob("shapes/red-circle-*"))[0]
    common = ["--store", str(store), *MODEL, "--json"]
    # Like a (new) red circle, unlike "a circle", among the old files only: the old red square and triangle.
    when = ["--mtime-from", "2019-12-31", "--mtime-to", str(OLD_MTIME + 60)]
    args = ["search", "--like", point_id(red_circle), "--not", "a circle", *when, "-k", "2"]
    hits = json.loads(run(*args, *common).stdout)
    assert sorted(Path(h["path"]).name for h in hits) == ["red-square-0002.jpg", "red-triangle-0003.jpg"]
    bad = run("search", "x", "--mtime-from", "yesterday-ish", *common, check=2)
    assert "--mtime-from" in bad.stderr and "ISO date" in bad.stderr
