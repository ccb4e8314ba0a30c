"""End to end through the real ``indexer`` console script, in subprocesses, with the learned test model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.shapes import write_dataset
from tests.support.badfiles import write_bad_corpus
from tests.support.clirun import INDEXER, MODEL, run, run_json


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """48 shapes (4 per class) indexed once into an embedded store: (folder, store)."""
    root = tmp_path_factory.mktemp("cli")
    folder, store = root / "shapes", root / "store"
    write_dataset(folder, 48, seed=21)
    summary = run_json("index", str(folder), "--store", str(store), *MODEL)
    assert (summary["indexed"], summary["failed"], summary["failures"]) == (48, 0, [])
    return folder, store


def test_text_search_ranks_red_circles_first(indexed: tuple[Path, Path]) -> None:
    _, store = indexed
    hits = run_json("search", "a red circle", "--limit", "4", "--store", str(store), *MODEL)
    assert [Path(h["path"]).name.split("-")[:2] for h in hits] == [["red", "circle"]] * 4
    assert hits == sorted(hits, key=lambda h: -h["score"])
    text = run("search", "a", "red", "circle", "--limit", "2", "--store", str(store), *MODEL).stdout
    assert text.count("red-circle-") == 2 and text.split()[0].startswith("0.")


def test_image_search_finds_its_own_class_first(indexed: tuple[Path, Path]) -> None:
    folder, store = indexed
    for probe in (sorted(folder.glob("yellow-triangle-*"))[0], sorted(folder.glob("green-square-*"))[0]):
        hits = run_json("search", "--image", str(probe), "--limit", "4", "--store", str(store), *MODEL)
        assert hits[0]["path"] == str(probe)
        cls = probe.name.split("-")[:2]
        assert all(Path(h["path"]).name.split("-")[:2] == cls for h in hits)


def test_search_threshold_and_filters(indexed: tuple[Path, Path]) -> None:
    folder, store = indexed
    probe = sorted(folder.glob("blue-circle-*"))[0]
    hits = run_json("search", "--image", str(probe), "--threshold", "0.999", "--store", str(store), *MODEL)
    assert [h["path"] for h in hits] == [str(probe)]
    none = run_json("search", "a red circle", "--format", "JPEG", "--store", str(store), *MODEL)
    assert none == []


def test_status_reports_store_model_and_count(indexed: tuple[Path, Path]) -> None:
    _, store = indexed
    status = run_json("status", "--store", str(store))
    assert status["store"] == str(store) and status["images"] == 48
    assert status["model"].startswith("shapes-clip@sha256:") and status["failed"] == 0
    assert "images:   48" in run("status", "--store", str(store)).stdout


def test_rerun_is_incremental(indexed: tuple[Path, Path]) -> None:
    folder, store = indexed
    summary = run_json("index", str(folder), "--store", str(store), *MODEL)
    assert (summary["indexed"], summary["unchanged"]) == (0, 48)


def test_bad_files_exit_1_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_dataset(folder, 4, seed=2)
    expected = write_bad_corpus(folder)
    proc = run("index", str(folder), "--store", str(tmp_path / "s"), *MODEL, "--json", check=1)
    summary = json.loads(proc.stdout)
    assert summary["indexed"] == 4 and summary["failed"] == len(expected)
    assert {Path(f["path"]).name for f in summary["failures"]} == set(expected)
    for name in expected:
        assert f"skipping {folder / name}: " in proc.stderr
    status = run_json("status", "--store", str(tmp_path / "s"))
    assert status["failed"] == len(expected) and status["failures"][0]["reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["index", "/no/such/folder"], "/no/such/folder does not exist"),
        (["index", ".", "--batch-size", "-3"], "invalid setting model.batch_size"),
        (["index", ".", "--device", "tpu"], "invalid setting model.device"),
        (["search", "x", "--model", "ViT-Q-1"], "unknown model"),
        (["search"], "give a TEXT"),
    ],
)
def test_usage_and_config_errors_exit_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run(*args, "--store", str(tmp_path / "s"), check=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_search_on_empty_store_says_so(tmp_path: Path) -> None:
    proc = run("search", "cats", "--store", str(tmp_path / "s"), *MODEL, check=2)
    assert "is empty" in proc.stderr and "indexer index" in proc.stderr


def test_embed_writes_parquet_and_npy(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    folder = tmp_path / "img"
    files = write_dataset(folder, 6, seed=4)
    (folder / "broken.png").write_bytes(b"")
    out = tmp_path / "vecs.parquet"
    proc = run("embed", str(folder), "--output", str(out), *MODEL, "--json", check=1)
    assert json.loads(proc.stdout)["failed"] == 1
    table = pq.read_table(out)
    assert table.column_names == ["path", "sha256", "width", "height", "embedding"]
    assert sorted(table.column("path").to_pylist()) == sorted(str(f) for f in files)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    npy = tmp_path / "vecs.npy"
    run("embed", str(folder / files[0].name), "--output", str(npy), *MODEL)
    matrix = np.load(npy)
    assert matrix.shape[0] == 1 and (tmp_path / "vecs.paths.txt").read_text() == f"{files[0]}\n"
    index = table.column("path").to_pylist().index(str(files[0]))
    assert float(matrix[0] @ vectors[index]) > 0.9999


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(tmp_path: Path) -> None:
    folder, store = tmp_path / "many", tmp_path / "store"
    write_dataset(folder, 400, seed=8, size=96)
    args = ["index", str(folder), "--store", str(store), *MODEL, "--batch-size", "4", "--workers", "1", "-v"]
    proc = subprocess.Popen([INDEXER, *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += "embedded 4 images" in line
        if seen == 3:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest
    done = run_json("status", "--store", str(store))["images"]
    assert 8 <= done < 400  # the batch logged last may still have been in flight
    summary = run_json("index", str(folder), "--store", str(store), *MODEL)
    assert summary["unchanged"] == done and summary["indexed"] == 400 - done


def _interrupt_after_batches(folder: Path, store: Path, batches: int) -> tuple[subprocess.Popen[str], float]:
    """Start `indexer index -v`, send SIGINT once ``batches`` batches are logged; (the process, the moment sent)."""
    args = ["index", str(folder), "--store", str(store), *MODEL, "--batch-size", "4", "--workers", "1", "-v"]
    proc = subprocess.Popen([INDEXER, *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += "embedded 4 images" in line
        if seen == batches:
            break
    proc.send_signal(signal.SIGINT)
    return proc, time.monotonic()


@pytest.mark.timeout(240)
def test_ctrl_c_ends_the_decode_workers_instead_of_waiting_for_them(tmp_path: Path) -> None:
    """Ctrl-C stops the decode workers at once: the run ends in a moment, not after the interpreter's teardown (which
    waited for the workers and freed torch object by object: 7-15 s in half the runs, over 60 s under load)."""
    folder = tmp_path / "many"
    write_dataset(folder, 200, seed=9, size=96)
    slowest = 0.0
    for trial in range(3):
        proc, sent = _interrupt_after_batches(folder, tmp_path / f"store{trial}", 2)
        rest = proc.communicate(timeout=60)[1]
        slowest = max(slowest, time.monotonic() - sent)
        assert proc.returncode == 130, rest
    assert slowest < 5.0, f"the slowest of 3 interrupted runs ended {slowest:.1f} s after Ctrl-C"


def test_store_in_use_is_a_clear_error(indexed: tuple[Path, Path]) -> None:
    _, store = indexed
    code = (
        "import pathlib, time; from indexer.store.edge_store import EdgeStore; "
        f"s = EdgeStore(pathlib.Path({str(store)!r})); s.count(); print('open', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        time.sleep(0.2)
        proc = run("status", "--store", str(store), check=2)
        assert "in use by another process" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_help_lists_every_command() -> None:
    out = run("--help").stdout
    for command in ("index", "embed", "search", "status"):
        assert command in out
