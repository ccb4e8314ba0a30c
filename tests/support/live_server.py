"""Helpers for the service tests: an indexed corpus of shapes, the real app served by uvicorn in a thread, and the
owner's side of its control routes."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from PIL import Image

from indexer.daemon.indexjobs import IndexJobs
from indexer.ingest.pipeline import run_index
from indexer.model.lazy import LazyModel
from indexer.settings import Settings
from indexer.store.factory import open_store_from_settings
from indexer.store.protocol import VectorStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset

OLD_MTIME = 1_577_880_000.0  # 2020-01-01 12:00 UTC: the "archive" folder's files


@dataclass
class Corpus:
    """Shapes indexed into an embedded store that this process holds open."""

    root: Path  # the served root
    shapes: Path  # 48 PNGs, 128 px, mtime now
    archive: Path  # 12 JPEGs, 256 px, mtime OLD_MTIME
    settings: Settings
    store: VectorStore
    model: LazyModel

    def files(self) -> list[Path]:
        return sorted([*self.shapes.glob("*.png"), *self.archive.glob("*.jpg")])


def write_archive(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` shapes as 256 px JPEGs dated OLD_MTIME (other size, format and age than the main folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for png in write_dataset(folder / ".tmp", count, seed=seed, size=256):
        jpg = folder / (png.stem + ".jpg")
        Image.open(png).convert("RGB").save(jpg, "JPEG", quality=92)
        os.utime(jpg, (OLD_MTIME, OLD_MTIME))
        png.unlink()
        out.append(jpg)
    (folder / ".tmp").rmdir()
    return out


def make_corpus(base: Path, shapes: int = 48, archive: int = 12, **serve: Any) -> Corpus:
    """Write and index the corpus under base/photos; the store is base/store, thumbnails base/thumbs."""
    root = base / "photos"
    write_dataset(root / "shapes", shapes, seed=21)
    if archive:
        write_archive(root / "archive", archive, seed=5)
    options = {"roots": [str(root)], "thumbnail_dir": str(base / "thumbs"), **serve}
    settings = shapes_settings(base / "store", serve=options)
    model = LazyModel(settings.model)
    store = open_store_from_settings(settings)
    summary = run_index([root], settings, store, model)
    assert (summary.indexed, summary.failed) == (shapes + archive, 0), summary.as_dict()
    return Corpus(root, root / "shapes", root / "archive", settings, store, model)


class Owner:
    """The owner's side the app asks (a real IndexJobs queue running the real pipeline): the control routes."""

    def __init__(self, settings: Settings, store: VectorStore, model: LazyModel) -> None:
        self.jobs = IndexJobs(lambda paths, job: run_index(paths, settings, store, model, job))

    def health(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok", "phase": "watching"}

    def describe(self) -> dict[str, Any]:
        return {"daemon": {"pid": 1, "url": "here"}}

    def metrics_text(self) -> bytes:
        return b"indexer_owner_up 1\n"


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run app with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def class_of(path: str) -> str:
    """'red-circle' for '/x/red-circle-0003.png'."""
    return "-".join(Path(path).name.split("-")[:2])
