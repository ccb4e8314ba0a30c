"""The fault suite, HTTP side (issue 10, defects 5, 6 and 7), through real HTTP.

* A folder (or the whole root) swapped for a symlink after indexing serves nothing from elsewhere (no serve.roots).
* Uploads are decoded off the engine thread, at most serve.max_decodes at once (one more: 503 + Retry-After), while
  /healthz keeps answering; the bound is read from the service's counters, not from timings.
* The hostile requests of the campaign, against both HTTP surfaces: `indexer serve` (uvicorn, in a thread) and the
  control endpoint of a real `indexer watch` process.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from indexer.api.routes import create_app
from indexer.daemon.client import advertised
from indexer.ingest.pipeline import run_index
from indexer.model.lazy import LazyModel
from indexer.records import point_id
from indexer.settings import Settings
from indexer.store.factory import open_store_from_settings
from indexer.store.protocol import VectorStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import INDEXER, MODEL, run
from tests.support.live_server import serve
from tests.support.rawhttp import raw_request

pytestmark = pytest.mark.faults


def _indexed(tmp_path: Path, roots: list[Path], **serve_options: Any) -> tuple[Settings, VectorStore, LazyModel]:
    options = {"roots": [], "thumbnail_dir": str(tmp_path / "th"), **serve_options}
    settings = shapes_settings(tmp_path / "store", serve=options)
    model = LazyModel(settings.model)
    store = open_store_from_settings(settings)
    run_index(roots, settings, store, model)
    return settings, store, model


# --- defect 6: symlink swaps ---------------------------------------------------------------------------------------


def test_a_folder_or_root_swapped_for_a_symlink_serves_nothing_from_elsewhere(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (sub_file,) = write_dataset(root / "sub", 1, seed=1, size=64)
    real_linked = tmp_path / "real-linked"
    (linked_file,) = write_dataset(real_linked, 1, seed=2, size=64)
    (root / "linked").symlink_to(real_linked)  # a symlinked folder at index time: served (README)
    elsewhere = tmp_path / "elsewhere"  # what an attacker points at: the same names, other content
    (other,) = write_dataset(elsewhere / "sub", 1, seed=3, size=96)
    assert other.name == sub_file.name

    settings, store, model = _indexed(tmp_path, [root])
    sub_id, linked_id = point_id(sub_file), point_id(root / "linked" / linked_file.name)
    try:
        with serve(create_app(settings, store, model, api_key="")) as url:

            def get(image_id: str) -> httpx.Response:
                return httpx.get(f"{url}/images/{image_id}", timeout=30)

            assert get(sub_id).content == sub_file.read_bytes()
            assert get(linked_id).content == linked_file.read_bytes()

            # the parent folder swapped for a symlink to elsewhere
            (root / "sub").rename(root / "sub.orig")
            (root / "sub").symlink_to(elsewhere / "sub")
            for path in (f"/images/{sub_id}", f"/images/{sub_id}/thumbnail"):
                answer = httpx.get(url + path, timeout=30)
                assert answer.status_code == 404 and answer.json()["error"] == "NotServableError", answer.text
            (root / "sub").unlink()
            (root / "sub.orig").rename(root / "sub")
            assert get(sub_id).status_code == 200

            # the whole root swapped for a symlink to a tree of the same shape
            root.rename(tmp_path / "root.orig")
            root.symlink_to(elsewhere)
            answer = get(sub_id)
            assert answer.status_code == 404 and "outside the served folders" in answer.json()["detail"]
    finally:
        store.close()


# --- defect 7: slow uploads ----------------------------------------------------------------------------------------


def _huge_png(side: int) -> bytes:
    """A small PNG that decodes to side x side pixels (seconds of decoding at 8000)."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def _examples_body(png: bytes, copies: int) -> dict[str, Any]:
    return {"positive": {"images": [base64.b64encode(png).decode()] * copies}, "limit": 3}


class _HealthPoller(threading.Thread):
    """GET /healthz every 50 ms until stopped; keeps the slowest answer time and every status."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.slowest, self.statuses = url, threading.Event(), 0.0, list[int]()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                self.statuses.append(client.get(self.url + "/healthz").status_code)
                self.slowest = max(self.slowest, time.monotonic() - started)
                time.sleep(0.05)


@pytest.fixture
def upload_service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    write_dataset(tmp_path / "photos", 4, seed=5, size=64)
    settings, store, model = _indexed(tmp_path, [tmp_path / "photos"], max_decodes=request.param)
    app = create_app(settings, store, model, api_key="")
    try:
        with serve(app) as url:
            yield url, app.state.service
    finally:
        store.close()


@pytest.mark.parametrize("upload_service", [1], indirect=True)
def test_one_upload_beyond_the_bound_is_refused_and_healthz_answers(upload_service: tuple[str, Any]) -> None:
    url, service = upload_service
    body = _examples_body(_huge_png(8000), copies=6)  # one request decoding six 8000x8000 images
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url + "/search", json=body, timeout=300)
        deadline = time.monotonic() + 60
        while service.gate.active == 0:  # the counter says the decode slot is taken
            assert time.monotonic() < deadline and not first.done(), "the upload never started decoding"
            time.sleep(0.01)
        refused = httpx.post(url + "/search", json=_examples_body(_huge_png(64), copies=1), timeout=60)
        started = time.monotonic()
        health = httpx.get(url + "/healthz", timeout=60)
        health_s = time.monotonic() - started
        still_decoding = service.gate.active == 1
        answer = first.result()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "ServiceBusyError" and "serve.max_decodes" in refused.json()["detail"]
    assert health.status_code == 200 and still_decoding
    assert health_s < 5.0, f"/healthz took {health_s:.1f} s while an upload decoded"
    assert answer.status_code == 200 and len(answer.json()["hits"]) == 3
    assert (service.gate.peak, service.gate.refused, service.gate.active) == (1, 1, 0)


@pytest.mark.parametrize("upload_service", [2], indirect=True)
def test_concurrent_uploads_hold_the_bound_while_healthz_answers(upload_service: tuple[str, Any]) -> None:
    url, service = upload_service
    png = _huge_png(8000)
    poller = _HealthPoller(url)
    poller.start()
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(url + "/search/image", files={"file": ("big.png", png)}, timeout=300), range(6)
            )
        )
    poller.stop.set()
    poller.join(timeout=60)
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert all(a.headers.get("retry-after") == "1" for a in answers if a.status_code == 503)
    assert service.gate.peak <= 2 and service.gate.refused == statuses.count(503)
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert f"indexer_upload_decodes_peak {float(service.gate.peak)}" in metrics
    assert poller.statuses and set(poller.statuses) == {200}
    assert poller.slowest < 5.0, f"/healthz took {poller.slowest:.1f} s during the uploads"


# --- defect 5's cases, on both HTTP surfaces -----------------------------------------------------------------------


def _raw(base: str, method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> Any:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return raw_request(host, int(port), method, path, body, headers)


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, str]]]:
    """{"serve": (url, a GET that reads the store), "daemon": (url, the same)}: both live."""
    base = tmp_path_factory.mktemp("surfaces")
    photos = base / "photos"
    write_dataset(photos, 4, seed=8, size=64)
    daemon_store = base / "daemon-store"
    daemon = subprocess.Popen(
        [INDEXER, "watch", str(photos), "--store", str(daemon_store), *MODEL, "--workers", "1", "--poll"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    settings = shapes_settings(base / "serve-store", serve={"roots": [str(photos)]})
    model = LazyModel(settings.model)
    store = open_store_from_settings(settings)
    run_index([photos], settings, store, model)
    try:
        deadline = time.monotonic() + 120
        while (found := advertised(daemon_store)) is None:
            assert daemon.poll() is None, f"indexer watch exited: {daemon.stderr.read() if daemon.stderr else ''}"
            assert time.monotonic() < deadline, "indexer watch did not advertise its control URL"
            time.sleep(0.2)
        with serve(create_app(settings, store, model, api_key="")) as url:
            yield {"serve": (url, "/search?q=red"), "daemon": (found["url"], "/control/status")}
    finally:
        store.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


JSON = ("Content-Type", "application/json")
QUERY = json.dumps({"positive": {"texts": ["red"]}}).encode()
HOSTILE = {
    "foreign Host on a read": ("GET", None, b"", (("Host", "evil.example"),), {403}),
    "foreign Host on a search": ("POST", "/search", QUERY, (("Host", "evil.example"), JSON), {403}),
    "Host [::1]evil.example": ("GET", None, b"", (("Host", "[::1]evil.example"),), {403}),
    "Host 127.0.0.1:evil": ("GET", None, b"", (("Host", "127.0.0.1:evil.example"),), {403}),
    "an empty Host": ("GET", None, b"", (("Host", ""),), {403}),
    "text/plain POST": ("POST", "/search", QUERY, (("Content-Type", "text/plain"),), {415}),
    "Content-Length abc": ("POST", "/search", b"", (JSON, ("Content-Length", "abc")), {400}),
    "Content-Length -1": ("POST", "/search", b"", (JSON, ("Content-Length", "-1")), {400}),
    "Content-Length 1e11": ("POST", "/search", b"", (JSON, ("Content-Length", "100000000000")), {413}),
    "a JSON list body": ("POST", "/search", b"[1, 2]", (JSON,), {400, 422}),
}


@pytest.mark.parametrize("surface", ["serve", "daemon"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_requests_get_the_same_clear_answer_on_both_surfaces(
    surfaces: dict[str, tuple[str, str]], surface: str, case: str
) -> None:
    url, read_path = surfaces[surface]
    method, path, body, headers, expected = HOSTILE[case]
    if surface == "daemon" and path == "/search":
        path = "/control/search"  # the daemon's app answers the CLI's search there
    status, data, seconds = _raw(url, method, path or read_path, body, headers)
    assert status in expected, (status, data)
    assert seconds < 5.0, f"{case} took {seconds:.1f} s"
    if data is not None:  # uvicorn answers a malformed request line itself, in text (the daemon's app too)
        assert isinstance(data, dict) and {"detail", "error"} <= data.keys(), data
        assert "store" not in data and "hits" not in data
    assert _raw(url, "GET", "/healthz")[0] == 200  # and the surface keeps answering


@pytest.mark.parametrize("surface", ["serve", "daemon"])
def test_a_request_without_a_host_header_is_refused_on_both_surfaces(
    surfaces: dict[str, tuple[str, str]], surface: str
) -> None:
    """HTTP/1.0 lets a client leave Host out; without an API key that is not a loopback request either."""
    url, read_path = surfaces[surface]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {read_path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"403", answer[:300]
    assert json.loads(body)["error"] == "HostNotAllowedError"


# -- slow clients (issue 22, defect 9): a real `indexer serve` with 256 open files allowed -----------------------

SLOW_CLIENTS = 300
NOFILE = 256


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def slow_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`indexer serve` over 8 indexed images, RLIMIT_NOFILE 256, client deadlines of 6 s; (base URL, port)."""
    base = tmp_path_factory.mktemp("slow")
    photos, store = base / "photos", base / "store"
    write_dataset(photos, 8, seed=21, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INDEXER_SERVE__HEADER_TIMEOUT": "6", "INDEXER_SERVE__BODY_TIMEOUT": "6"}
    with (base / "serve.log").open("w") as out:
        proc = subprocess.Popen(
            [INDEXER, "serve", "--store", str(store), *MODEL, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_limit_open_files,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (base / "serve.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "indexer serve did not start"
            time.sleep(0.5)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _slow_clients(port: int, count: int, first: bytes) -> list[socket.socket]:
    """``count`` loopback connections that each send ``first`` and then nothing."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(first)
        clients.append(client)
    return clients


def _closed_by_server(client: socket.socket, until: float) -> bool:
    """Whether the server closes ``client`` (after a refusal, or with nothing said) before ``until``."""
    while (left := until - time.monotonic()) > 0:
        client.settimeout(left)
        try:
            if client.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


@pytest.mark.timeout(180)
def _healthz_within(url: str, deadline: float) -> int:
    """The status of the first /healthz that answers 200 before ``deadline`` (or the last one's)."""
    status = 0
    while True:
        try:
            status = httpx.get(url + "/healthz", timeout=3).status_code
        except httpx.TransportError:
            status = 0
        if status == 200 or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.parametrize(
    "first",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"q',
    ],
    ids=["half-sent headers", "half-sent body"],
)
def test_slow_clients_are_cut_off_and_healthz_answers_beyond_the_open_files_limit(
    slow_serve: tuple[str, int], first: bytes
) -> None:
    url, port = slow_serve
    clients = _slow_clients(port, SLOW_CLIENTS, first)
    try:
        started = time.monotonic()
        # Half-sent headers: the idle connection is closed for it at once. Half-sent bodies keep every connection
        # busy until their deadline: /healthz may get a 503 (never a hang) until the deadline frees them.
        assert _healthz_within(url, started + 6 + 20) == 200
        found = httpx.get(url + "/search", params={"q": "a red circle", "limit": 3}, timeout=30)
        assert found.status_code == 200 and found.json()["hits"], found.text
        deadline = started + 6 + 20  # the 6 s deadline, and slack for a loaded machine
        still_open = [c for c in clients if not _closed_by_server(c, deadline)]
        assert not still_open, f"{len(still_open)} of {SLOW_CLIENTS} slow connections still open after 26 s"
    finally:
        for client in clients:
            client.close()
