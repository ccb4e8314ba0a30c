"""Known failures and the run's messages, through the real ``indexer`` console script: a file that failed and is
unchanged (size, mtime) is not read again by the next `index`, which says so and exits 0 unless something new
failed; ``--retry-failed`` reads them again; a changed file is always read again. `embed` reports what it wrote,
and counts read in the singular where there is one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tests.fixtures.shapes import write_dataset
from tests.support.clirun import MODEL, run, run_json


def index(folder: Path, store: Path, *extra: str, check: int) -> tuple[dict[str, Any], str]:
    """`indexer index --json`: (its summary, its stderr)."""
    proc = run("index", str(folder), "--store", str(store), *MODEL, *extra, "--json", check=check)
    return json.loads(proc.stdout), proc.stderr


def test_an_unchanged_failed_file_is_not_read_again(tmp_path: Path) -> None:
    folder, store = tmp_path / "photos", tmp_path / "store"
    write_dataset(folder, 4, seed=5, size=64)
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png at all")
    first, err = index(folder, store, check=1)
    assert (first["indexed"], first["failed"], first["known_failures"]) == (4, 1, 0)
    assert f"skipping {broken}" in err

    again = run("index", str(folder), "--store", str(store), *MODEL, check=0)  # exit 0: nothing new failed
    assert "1 known failure (indexer status lists them" in again.stdout
    assert "failed 0" in again.stdout and f"skipping {broken}" not in again.stderr
    status = run_json("status", "--store", str(store))
    assert status["failed"] == 1 and status["failures"][0]["path"] == str(broken)

    (folder / "empty.jpg").write_bytes(b"")  # something new fails: exit 1, the old one stays known
    new, err = index(folder, store, check=1)
    assert (new["failed"], new["known_failures"]) == (1, 1) and f"skipping {broken}" not in err
    assert [Path(str(f["path"])).name for f in new["failures"]] == ["empty.jpg"]

    retried, err = index(folder, store, "--retry-failed", check=1)
    assert (retried["indexed"], retried["failed"], retried["known_failures"]) == (0, 2, 0)
    assert f"skipping {broken}" in err

    stat = broken.stat()  # same bytes, a new mtime: changed, so read again
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched, _ = index(folder, store, check=1)
    assert (touched["failed"], touched["known_failures"]) == (1, 1)

    shutil.copy(folder / sorted(p.name for p in folder.glob("*.png") if p != broken)[0], broken)  # repaired
    fixed, _ = index(folder, store, check=0)
    assert (fixed["indexed"], fixed["failed"], fixed["known_failures"]) == (1, 0, 1)
    status = run_json("status", "--store", str(store))
    assert [f["path"] for f in status["failures"]] == [str(folder / "empty.jpg")]


def test_embed_reports_what_it_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    write_dataset(folder, 1, seed=6, size=64)
    out = tmp_path / "one.npy"
    proc = run("embed", str(folder), "--output", str(out), *MODEL, check=0)
    assert proc.stdout.splitlines()[0] == f"wrote 1 embedding to {out}, failed 0"
    assert "unchanged" not in proc.stdout and "moved" not in proc.stdout and "removed" not in proc.stdout


def test_counts_of_one_read_in_the_singular(tmp_path: Path) -> None:
    folder, store = tmp_path / "lib", tmp_path / "store"
    (original,) = write_dataset(folder, 1, seed=7, size=64)
    shutil.copy(original, folder / "copy.png")
    index(folder, store, check=0)
    text = run("dedup", "--tier", "exact", "--store", str(store)).stdout
    assert "1 group, 1 duplicate among 2 images" in text
    moved = run("dedup", "--tier", "exact", "--store", str(store), "--move-to", str(tmp_path / "dups")).stdout
    assert "dry run: move 1 file (" in moved and "moved 1 file, 0 failed" in moved
