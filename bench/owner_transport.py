"""Points with vectors through the store's owner: what `indexer export` and `dedup` read (scroll) and `indexer import`
writes (upsert) while a daemon holds the store, for two trees side by side (``--old``: a checkout of an earlier
commit; PYTHONPATH selects the code, as `bench_index.py --old` does).

    python -m bench.owner_transport --n 100000 --dir /tmp/owner-100k --old /tmp/indexer-559d259 [--upsert 20000]

The store (N CLIP-like 768-d points, `bench/vectors.py`, with a payload as `indexer index` writes) is built once in
DIR. Each run is a fresh pair of processes with one tree's code: the owner (the real app, `create_app` with the
control routes, over a `LockedStore` of the `EdgeStore`, served by uvicorn on loopback) and the client (the
`RemoteStore` the library commands use). The client times, one after another: a scroll of every point with its
vector (pages of 1,000, as `export` and `dedup` ask), `export_store` to Parquet, and an upsert of the first
``--upsert`` points again (the same ids and vectors: the store does not change). Its peak RSS (VmHWM, reset before
each phase) is its own; the CPU time per point is shown for both processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 1_000
CHUNK = 10_000


def points(first: int, count: int) -> list[Any]:
    """Points [first, first + count) of the bench library: CLIP-like vectors, a payload as the indexer writes (the
    same points for the same range, drawn CHUNK rows at a time)."""
    return [p for start in range(first, first + count, CHUNK) for p in _chunk(start, min(CHUNK, first + count - start))]


def _chunk(first: int, count: int) -> list[Any]:
    import numpy as np

    from bench.vectors import ClipLike
    from indexer.records import StoredPoint, dirs_of, point_id

    assert first % CHUNK == 0
    rows = ClipLike(10**6).chunk(first, first + CHUNK)[0][:count]
    out = []
    for i, row in zip(range(first, first + count), rows, strict=True):
        path = Path(f"/photos/{2015 + i % 10}/{i % 97:02d}/IMG_{i:07d}.jpg")
        payload = {"path": str(path), "dirs": dirs_of(path), "size": 3_000_000 + i, "mtime": 1.5e9 + i,
                   "mtime_ns": 1_500_000_000 * 10**9 + i, "sha256": f"{i:064x}", "width": 4000, "height": 3000,
                   "format": "JPEG", "real_dir": str(path.parent)}  # fmt: skip
        out.append(StoredPoint(point_id(path), payload, np.asarray(row, dtype=np.float32)))
    return out


def settings_for(store: Path) -> Any:
    from indexer.settings import load_settings

    return load_settings(None, {"store": {"dir": store}, "model": {"name": "ViT-L-14", "pretrained": "none"}})


def build(store: Path, n: int) -> None:
    from indexer.store.edge_store import EdgeStore

    with EdgeStore(store) as edge:
        edge.ensure_collection("bench-clip-like", 768)
        for first in range(0, n, CHUNK):
            edge.upsert(points(first, min(CHUNK, n - first)))
        edge.flush()


def _no_index(paths: Any, job: Any) -> Any:
    raise RuntimeError("the bench's owner indexes nothing")


class BenchOwner:
    """The owner's side the app asks (nothing to index, always healthy)."""

    def __init__(self) -> None:
        from indexer.daemon.indexjobs import IndexJobs

        self.jobs = IndexJobs(_no_index)

    def health(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok"}

    def describe(self) -> dict[str, Any]:
        return {"daemon": {"pid": os.getpid()}}

    def metrics_text(self) -> bytes:
        return b""


def serve_owner(store: Path) -> None:
    """The owner: the real app over the store, on a free loopback port printed first; until SIGTERM."""
    import uvicorn

    from indexer.api.routes import create_app
    from indexer.model.lazy import LazyModel
    from indexer.store.edge_store import EdgeStore
    from indexer.store.locked import LockedStore

    settings = settings_for(store)
    shared = LockedStore(lambda: EdgeStore(store))
    app = create_app(settings, shared, LazyModel(settings.model), api_key="", owner=BenchOwner(), page=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
    finally:
        shared.close()


def cpu_s(pid: int | str = "self") -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(name: str, count: int, owner: int, run: Callable[[], int], into: dict[str, Any]) -> None:
    """Time ``run`` (it returns how many points it moved), this process's peak RSS reset first; the CPU time of
    both sides."""
    from bench.procstat import hwm_mb

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    wall, cpu, owner_cpu = time.perf_counter(), cpu_s(), cpu_s(owner)
    moved = run()
    wall, cpu, owner_cpu = time.perf_counter() - wall, cpu_s() - cpu, cpu_s(owner) - owner_cpu
    assert moved == count, (name, moved, count)
    into[name] = {"points_per_s": round(count / wall), "client_cpu_us": round(cpu / count * 1e6, 1),
                  "owner_cpu_us": round(owner_cpu / count * 1e6, 1), "peak_rss_mb": round(hwm_mb(), 1)}  # fmt: skip


def client(url: str, owner: int, store: Path, n: int, upsert: int) -> dict[str, Any]:
    """The CLI's side: scroll, export and upsert through the owner at ``url`` (process ``owner``)."""
    from bench.procstat import status_mb
    from indexer.daemon.client import OwnerClient
    from indexer.daemon.remote import RemoteStore
    from indexer.library.export import export_store

    remote = RemoteStore(OwnerClient(url, settings_for(store)))
    got: dict[str, Any] = {"rss_before_mb": round(status_mb("VmRSS"), 1)}
    phase("scroll", n, owner, lambda: sum(1 for _ in remote.scroll(with_vectors=True, batch_size=BATCH)), got)
    with tempfile.TemporaryDirectory() as tmp:
        phase("export", n, owner, lambda: export_store(remote, Path(tmp) / "out.parquet", batch_size=BATCH), got)
    again = points(0, upsert)

    def upsert_again() -> int:
        remote.upsert(again)
        return len(again)

    phase("upsert", upsert, owner, upsert_again, got)
    return got


def measure(tree: Path, store: Path, n: int, upsert: int) -> dict[str, Any]:
    """One owner and one client, each a fresh process with the code of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    me = [sys.executable, str(Path(__file__).resolve())]
    owner = subprocess.Popen([*me, "--serve", str(store)], env=env, cwd=tempfile.gettempdir(),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert owner.stdout is not None
        url = owner.stdout.readline().strip()
        assert url.startswith("http://"), f"the owner did not start (exit {owner.poll()})"
        cmd = [*me, "--client", url, "--owner", str(owner.pid), "--dir", str(store.parent), "--n", str(n),
               "--upsert", str(upsert)]  # fmt: skip
        out = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, stdout=subprocess.PIPE, text=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        owner.terminate()
        owner.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=Path("."), help="the store is DIR/store (built when missing)")
    parser.add_argument("--upsert", type=int, default=20_000, help="points upserted again through the owner")
    parser.add_argument("--old", type=Path, help="another tree to run side by side (PYTHONPATH selects the code)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the best of each is shown")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--owner", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    store = args.dir / "store"
    if args.serve:
        serve_owner(args.serve)
    elif args.client:
        print(json.dumps(client(args.client, args.owner, store, args.n, args.upsert)))
    else:
        run(args, store)


def run(args: argparse.Namespace, store: Path) -> None:
    """Both trees, interleaved, and the table."""
    if not store.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        build(store, args.n)
    trees = {**({"old": args.old} if args.old else {}), "new": ROOT}
    best: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeat):  # interleaved: a burst of load elsewhere hits both trees alike
        for name, tree in trees.items():
            got = measure(tree, store, args.n, args.upsert)
            loads.append(os.getloadavg()[0])
            old = best.get(name)
            best[name] = got if old is None or got["scroll"]["points_per_s"] > old["scroll"]["points_per_s"] else old
    print(f"{args.n} points, 768-d, through a real owner on loopback; upsert of {args.upsert}; best of {args.repeat}")
    print(f"{'tree':5} {'phase':7} {'points/s':>9} {'client CPU µs/pt':>17} {'owner CPU µs/pt':>16} "
          f"{'client peak RSS MB':>19}")  # fmt: skip
    for name, got in best.items():
        for what in ("scroll", "export", "upsert"):
            row = got[what]
            print(f"{name:5} {what:7} {row['points_per_s']:>9,} {row['client_cpu_us']:>17} {row['owner_cpu_us']:>16} "
                  f"{row['peak_rss_mb']:>19}")  # fmt: skip
        print(f"{name:5} RSS after imports, before the first phase: {got['rss_before_mb']} MB")
    print(f"load average (1 min) during the runs: {', '.join(f'{x:.1f}' for x in loads)}")


if __name__ == "__main__":
    main()
